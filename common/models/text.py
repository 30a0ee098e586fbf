"""The mT5 text encoder wrapper and the caption cleaner shared by stage 1 and sampling.

Upstream (Open-Sora-Plan v1.2.0): `MT5EncoderModel` from google/mt5-xxl, output = last_hidden_state (final layer
norm included), tokenised to 512 tokens with padding="max_length", truncation and the EOS appended;
the attention mask goes to the encoder and, later, to the DiT's cross-attention. The empty caption
"" becomes [EOS, pad x 511] with mask [1, 0 x 511].

Caption cleaning (as upstream): the DeepFloyd-IF cleaner of diffusers' IF pipeline, applied twice,
with one difference that Open-Sora Plan made: the line deleting the CJK unified ideographs
(U+4E00-U+9FFF) is disabled (mT5 is multilingual). As upstream, it always runs
BeautifulSoup(caption, "html.parser").text and ftfy.fix_text (both are dependencies of osp, pinned in
pyproject.toml), so a cache does not depend on what else a machine has installed; the shard manifest
records the cleaner's identity (`cleaner_identity()`: rules + ftfy and beautifulsoup4 versions).
"""

from __future__ import annotations

import functools
import hashlib
import html
import io
import json
import pickle
import re
import urllib.parse as ul
import warnings
from importlib.metadata import version
from pathlib import Path

import ftfy
import torch
from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

from osp.common.config import TEXT_MAX_LENGTH
from osp.common.errors import ConfigError, MissingFileError
from osp.common.hashing import sha256_file, sha256_files

# --------------------------------------------------------------------------------------------------
# caption cleaner
# --------------------------------------------------------------------------------------------------

# Captions that look like a URL or a file name are still captions (bs4 warns about such markup).
warnings.filterwarnings("ignore", category=MarkupResemblesLocatorWarning)

CLEANER_NAME = "deepfloyd-if-x2-keep-cjk"  # bump when a rule below changes: it names the cache's text

_URL_HTTP = re.compile(
    r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"
)
_URL_WWW = re.compile(
    r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"
)
# CJK blocks that the IF cleaner deletes; U+4E00-U+9FFF (CJK unified ideographs) is kept on purpose.
_CJK_DELETED = [
    re.compile(r"[\u31c0-\u31ef]+"),  # CJK strokes
    re.compile(r"[\u31f0-\u31ff]+"),  # katakana phonetic extensions
    re.compile(r"[\u3200-\u32ff]+"),  # enclosed CJK letters and months
    re.compile(r"[\u3300-\u33ff]+"),  # CJK compatibility
    re.compile(r"[\u3400-\u4dbf]+"),  # CJK unified ideographs extension A
    re.compile(r"[\u4dc0-\u4dff]+"),  # yijing hexagram symbols
]
_DASHES = re.compile(
    r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
    r"\uFE31\uFE32\uFE58\uFE63\uFF0D]+"
)
_BAD_PUNCT = re.compile(r"[" + "#®•©™&@·º½¾¿¡§~" + r"\)\(\]\[\}\{\|" + "\\" + r"\/\*" + r"]{1,}")
_DASH_OR_UNDERSCORE = re.compile(r"(?:\-|\_)")

# (pattern, replacement) applied in order after the HTML/handle/CJK/dash steps.
_RULES_1 = [
    (r"[`´«»“”¨]", '"'),  # quotes to one standard
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # ip addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # literal backslash-n
    (r"#\d{1,3}\b", ""),  # "#123"
    (r"#\d{5,}\b", ""),  # "#12345.."
    (r"\b\d{6,}\b", ""),  # "123456.."
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", '"'),  # """quoted"""
    (r"[\.]{2,}", " "),  # ellipses
    (_BAD_PUNCT, " "),  # ***word***, #word, (word)
    (r"\s+\.\s+", " "),  # " . "
]
_RULES_2 = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # 1920x1080
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),  # space after punctuation
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),  # surrounding quotes
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
]


def _clean_once(caption: str) -> str:
    caption = ul.unquote_plus(str(caption))
    caption = caption.strip().lower()
    caption = re.sub("<person>", "person", caption)
    caption = _URL_HTTP.sub("", caption)
    caption = _URL_WWW.sub("", caption)
    caption = BeautifulSoup(caption, features="html.parser").text
    caption = re.sub(r"@[\w\d]+\b", "", caption)  # @nickname
    for pattern in _CJK_DELETED:
        caption = pattern.sub("", caption)
    caption = _DASHES.sub("-", caption)
    for pattern, repl in _RULES_1:
        caption = re.sub(pattern, repl, caption)
    if len(_DASH_OR_UNDERSCORE.findall(caption)) > 3:  # this-is-my-cute-cat / this_is_my_cute_cat
        caption = _DASH_OR_UNDERSCORE.sub(" ", caption)
    caption = ftfy.fix_text(caption)
    caption = html.unescape(html.unescape(caption))
    for pattern, repl in _RULES_2:
        caption = re.sub(pattern, repl, caption)
    return caption.strip()


def clean_caption(text: str) -> str:
    """Clean a caption or prompt as upstream does: the IF cleaner, applied twice."""
    return _clean_once(_clean_once(text))


def cleaner_identity() -> dict:
    """What cleaned the captions: recorded in the shard manifest (same identity -> same cleaned text)."""
    return {"name": CLEANER_NAME, "ftfy": version("ftfy"), "beautifulsoup4": version("beautifulsoup4")}


# --------------------------------------------------------------------------------------------------
# hashing helpers (identities recorded in shard manifests and sample sidecars)
# --------------------------------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------------------------------
# the encoder wrapper
# --------------------------------------------------------------------------------------------------


BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_BIN_FIX = "re-download the text encoder (preferably as model.safetensors)"


def _refusal(e: Exception) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    what = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[-1] if lines else "not plain tensors")
    what = what.split(". Please")[0].rstrip(".")  # not torch's advice to allow-list the global
    return f"the .bin weights were refused ({what}); they would run code when unpickled; {_BIN_FIX}"


def check_bin_weights(path: Path) -> None:
    """The legacy `.bin` weights that transformers reads when a folder has no safetensors must each be a
    plain {name: tensor} pickle: loaded here with weights_only (nothing runs) onto the meta device (no
    data is read), anything else is refused with one line naming the file."""
    if any(path.glob("*.safetensors")):
        return  # transformers prefers them and never opens a .bin
    index = path / BIN_INDEX
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [BIN_WEIGHTS]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{index}: not a weight index ({type(e).__name__}: {e}); {_BIN_FIX}") from None
    for name in names:
        f = path / name
        if not f.is_file():
            continue  # transformers names what is missing
        try:
            state = torch.load(f, map_location="meta", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(f"{f}: {_refusal(e)}") from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            raise ConfigError(f"{f}: not a readable torch weights file ({type(e).__name__}); {_BIN_FIX}") from None
        if not isinstance(state, dict):
            raise ConfigError(f"{f}: holds a {type(state).__name__}, not weights (name -> tensor); {_BIN_FIX}")
        bad = next(((k, v) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        if bad is not None:
            raise ConfigError(
                f"{f}: entry {str(bad[0])[:80]!r} is a {type(bad[1]).__name__}, not a tensor; the file holds more "
                f"than weights; {_BIN_FIX}"
            )


class TextEncoder:
    """mT5 encoder + tokenizer from a local folder (no network): captions -> hidden states + mask."""

    def __init__(self, model, tokenizer, path: Path, max_length: int = TEXT_MAX_LENGTH):
        self.model = model
        self.tokenizer = tokenizer
        self.path = Path(path)
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        max_length: int = TEXT_MAX_LENGTH,
    ) -> "TextEncoder":
        """Load `path` (a google/mt5-* folder or one written by write_tiny_text_encoder) onto `device`
        (the caller's choice). dtype: None -> fp32 on CPU, bf16 elsewhere."""
        from transformers import AutoTokenizer, MT5EncoderModel
        from transformers.utils import logging as hf_logging

        path = Path(path)
        if not (path / "config.json").is_file():
            raise MissingFileError(
                f"{path}/config.json not found: --text-encoder must be a local mT5 folder "
                f"(e.g. a download of google/mt5-xxl, or `osp demo-models OUT` -> OUT/text_encoder)"
            )
        device = torch.device(device)
        default_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        dtype = dtype or default_dtype
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # silence the "unused decoder weights" notice of full T5 folders
        hf_logging.disable_progress_bar()
        try:
            check_bin_weights(path)  # before transformers reads a .bin: a refusal names the file
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            if (path / CONVERTED_NAME).is_file():  # encoder-only bf16 safetensors: memory-mapped
                model = _load_converted(path, dtype)
            else:
                model = MT5EncoderModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        except pickle.UnpicklingError as e:  # a .bin whose pickle holds more than tensors: refused, one line
            raise ConfigError(f"{path}: {_refusal(e)}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        model.to(device).eval().requires_grad_(False)  # pyright: ignore[reportArgumentType, reportCallIssue]
        if len(tokenizer) > model.config.vocab_size:
            raise ConfigError(
                f"{path}: tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}; "
                f"the folder mixes two models, re-download or re-create it"
            )
        return cls(model, tokenizer, path, max_length)

    # ---- properties --------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- tokenise / encode -------------------------------------------------------------------------
    def tokenize(self, captions: list[str], pad_to_max: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask [B, L] (L = max_length, or the longest caption if not pad_to_max); EOS appended."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not one string")
        out = self.tokenizer(
            list(captions),
            max_length=self.max_length,
            padding="max_length" if pad_to_max else "longest",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_ids"], out["attention_mask"]

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """emb [B, max_length, D] (model dtype, on the model's device), mask [B, max_length] (int64).
        Captions are used as given: clean them first with clean_caption if wanted."""
        ids, mask = self.tokenize(captions, pad_to_max=True)
        step = batch_size or len(captions) or 1
        embs = [self._forward(ids[i : i + step], mask[i : i + step]) for i in range(0, len(captions), step)]
        return torch.cat(embs), mask.to(self.device)

    @torch.no_grad()
    def encode_unpadded(self, captions: list[str], pad_to_max: bool = False) -> list[torch.Tensor]:
        """One [L_i, D] tensor per caption: the valid rows only (L_i = real tokens incl. EOS).

        By default the batch is padded only to its longest caption, not to 512: padded keys get no
        attention weight in the encoder and T5's relative position bias does not depend on the padded
        length, so the valid rows equal those of the padded-512 encoding (up to reduction-order
        rounding) at a fraction of the cost. pad_to_max=True runs the exact upstream 512 shape."""
        ids, mask = self.tokenize(captions, pad_to_max=pad_to_max)
        emb = self._forward(ids, mask)
        lengths = mask.sum(dim=1).tolist()
        return [emb[i, : int(n)].clone() for i, n in enumerate(lengths)]

    # ---- identity ----------------------------------------------------------------------------------
    def identity(self) -> dict:
        """What produced the embeddings: for the shard manifest and the sample sidecar."""
        root = self.path
        weights = [p for p in root.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)]
        tok_files = [root / n for n in _TOKENIZER_FILES if (root / n).is_file()]
        config = json.loads((root / "config.json").read_text())
        return {
            "name": config.get("_name_or_path") or root.name,
            "path": str(root.resolve()),
            "class": "MT5EncoderModel",
            "config_sha256": sha256_file(root / "config.json"),
            "weights_sha256": sha256_files(weights, root),
            "tokenizer_sha256": sha256_files(tok_files, root),
            "vocab_size": int(self.model.config.vocab_size),
            "d_model": self.dim,
            "max_length": self.max_length,
            "dtype": str(self.dtype).removeprefix("torch."),
            "source": source_identity(root),
            "text_id": text_encoder_id(root, self.dtype, self.max_length),
        }


# --------------------------------------------------------------------------------------------------
# identity shared by a full mT5 folder and its encoder-only conversion; the converted folder
# --------------------------------------------------------------------------------------------------

CONVERTED_NAME = "osp_text_encoder.json"  # in a folder written by convert_text_encoder: what it came from
CONVERTED_WEIGHTS = "model.safetensors"
_ENCODER_CONFIG_KEYS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "feed_forward_proj",
    "layer_norm_epsilon",
    "pad_token_id",
    "eos_token_id",
)


def source_identity(path: str | Path) -> dict:
    return dict(_source_identity(str(Path(path).resolve())))


@functools.lru_cache(maxsize=8)
def _source_identity(path: str) -> dict:
    """The identity of the weights an encoder folder holds, the same for a google/mt5-* download and
    for its conversion (`osp convert text-encoder` records the source's): encoder config fields,
    tokenizer digest and the source's weight digest."""
    root = Path(path)
    conv = root / CONVERTED_NAME
    if conv.is_file():
        try:
            return dict(json.loads(conv.read_text())["source"])
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{conv}: unreadable ({e}); re-run osp convert text-encoder") from None
    config = json.loads((root / "config.json").read_text())
    weights = [p for p in root.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)]
    tok_files = [root / n for n in _TOKENIZER_FILES if (root / n).is_file()]
    return {
        "encoder_config": {k: config.get(k) for k in _ENCODER_CONFIG_KEYS},
        "tokenizer_sha256": sha256_files(tok_files, root),
        "weights_sha256": sha256_files(weights, root),
        "weights_dtype": str(config.get("torch_dtype") or config.get("dtype") or "float32"),
    }


def _stored_dtype(path: Path) -> str | None:
    conv = path / CONVERTED_NAME
    return json.loads(conv.read_text()).get("dtype") if conv.is_file() else None


def text_encoder_id(path: str | Path, dtype: torch.dtype, max_length: int = TEXT_MAX_LENGTH) -> str:
    """The text encoder's identity as a text cache key uses it: the source weights, the compute dtype and
    the max length. A converted (bf16) folder run in bf16 computes what its source computes in bf16, so
    both give the same id; run in fp32 it is marked as bf16-rounded weights (another id)."""
    root = Path(path)
    compute = str(dtype).removeprefix("torch.")
    stored = _stored_dtype(root)
    effective = compute if stored is None or stored == compute else f"{compute}-from-{stored}-weights"
    src = source_identity(root)
    body = json.dumps(
        {
            "source": {k: src.get(k) for k in ("encoder_config", "tokenizer_sha256", "weights_sha256")},
            "compute_dtype": effective,
            "max_length": int(max_length),
        },
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()


def _load_converted(path: Path, dtype: torch.dtype):
    """An encoder-only safetensors folder onto meta, then its tensors assigned as memory-mapped views:
    the ranks of a node share the page cache instead of each holding a copy (a dtype other than the
    stored one casts, and then copies)."""
    from safetensors.torch import load_file
    from transformers import MT5Config, MT5EncoderModel

    config = MT5Config.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = MT5EncoderModel(config)
    state = load_file(str(path / CONVERTED_WEIGHTS))  # mmap-backed on the CPU
    state = {k: (v if v.dtype == dtype else v.to(dtype)) for k, v in state.items()}
    if "shared.weight" in state and "encoder.embed_tokens.weight" not in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in ("encoder.embed_tokens.weight", "shared.weight")]
    if missing or unexpected:
        raise ConfigError(
            f"{path / CONVERTED_WEIGHTS}: does not match its config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); re-run osp convert text-encoder"
        )
    model.tie_weights()
    return model


def convert_text_encoder(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A full mT5 folder (encoder + decoder, any dtype, .bin or safetensors) -> DST: the encoder only,
    `dtype` safetensors, the tokenizer files and CONVERTED_NAME (the source's identity). Returns the
    record written."""
    import shutil

    from safetensors.torch import save_file
    from transformers import MT5EncoderModel
    from transformers.utils import logging as hf_logging

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise MissingFileError(f"{src}/config.json not found: SRC must be a local mT5 folder (google/mt5-xxl)")
    if dst.exists() and any(dst.iterdir()):
        raise ConfigError(f"{dst}: exists and is not empty; pass a new output folder")
    check_bin_weights(src)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = MT5EncoderModel.from_pretrained(src, local_files_only=True, dtype=torch.float32)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{src}: {_refusal(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    save_file(state, str(tmp / CONVERTED_WEIGHTS), metadata={"format": "pt"})
    model.config.torch_dtype = dtype
    model.config.save_pretrained(tmp)
    for f in src.iterdir():  # the tokenizer's files (not weights, not the model configs)
        if (
            f.is_file()
            and not f.name.endswith(_WEIGHT_SUFFIXES)
            and f.name not in ("config.json", "generation_config.json")
            and not f.name.endswith(".index.json")
        ):
            shutil.copy2(f, tmp / f.name)
    record = {
        "format": 1,
        "dtype": str(dtype).removeprefix("torch."),
        "source": source_identity(src),
        "from": str(src.resolve()),
    }
    (tmp / CONVERTED_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.rmdir()
    tmp.rename(dst)
    return record


# --------------------------------------------------------------------------------------------------
# the tiny text encoder (tests and the demo)
# --------------------------------------------------------------------------------------------------

TINY_D_MODEL = 64  # = the tiny DiT's caption_channels

_TINY_WORDS = (
    "a an the of in on at with and over under through into from by near across along behind between "
    "red green blue yellow orange purple white black grey brown pink golden silver dark bright "
    "ball cat dog bird fish horse cow sheep car bus train boat plane bike man woman child girl boy "
    "people crowd tree forest flower grass field river lake ocean sea wave beach sand mountain hill "
    "sky cloud sun moon star rain snow fog city street road bridge building house room window door "
    "runs walks jumps flies swims rolls bounces falls spins moves drives rides sits stands dances "
    "slowly quickly gently camera pans zooms tilts close up aerial view shot scene video clip frame "
    "sunset sunrise night day morning evening light shadow water fire smoke glass metal wooden stone "
    "masterpiece best quality ultra detailed unwatermarked nsfw lowres bad anatomy hands text error "
    "missing fingers extra digit fewer digits cropped worst low normal jpeg artifacts signature "
    "watermark username blurry emotional harmonious vignette 4k epic shot kodak 35mm photo sharp focus"
).split()


def _tiny_corpus() -> list[str]:
    """A fixed corpus: every word, plus deterministic 8-word sentences; covers a-z, 0-9, punctuation."""
    n = len(_TINY_WORDS)
    sents = [" ".join(_TINY_WORDS[(i * 7 + j * 13) % n] for j in range(8)) for i in range(400)]
    sents.append("abcdefghijklmnopqrstuvwxyz 0123456789 , . ( ) ' \" - : ; ! ?")
    sents.append(" ".join(_TINY_WORDS))
    return sents


def _train_tiny_spm(vocab_size: int = 256) -> bytes:
    """A real unigram SentencePiece model in the T5 id layout (pad 0, eos 1, unk 2, no bos).
    Deterministic: the same bytes on every call (single-threaded trainer, fixed corpus)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def write_tiny_text_encoder(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random tiny MT5EncoderModel (d_model 64) + a real SentencePiece tokenizer to `out_dir`,
    loadable offline by TextEncoder.from_pretrained. Same seed -> same weights and tokenizer."""
    from transformers import MT5Config, MT5EncoderModel, T5Tokenizer
    from transformers.utils import logging as hf_logging

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiece.model").write_bytes(_train_tiny_spm())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = T5Tokenizer.from_pretrained(out, extra_ids=0, local_files_only=True)
        tokenizer.model_max_length = TEXT_MAX_LENGTH
        tokenizer.save_pretrained(out)
        config = MT5Config(
            vocab_size=len(tokenizer),
            d_model=TINY_D_MODEL,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MT5EncoderModel(config)
        model.save_pretrained(out, safe_serialization=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return out
