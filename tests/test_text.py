"""Caption cleaner (hand-written expectations) and the mT5 wrapper on the tiny text encoder."""

from __future__ import annotations

import pytest
import torch

from osp.common.config import TEXT_MAX_LENGTH
from osp.common.models.text import (
    CLEANER_NAME,
    TextEncoder,
    _clean_once,
    clean_caption,
    cleaner_identity,
    write_tiny_text_encoder,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A Red Ball (bouncing) on the FIELD.", "a red ball bouncing on the field."),
        # the upstream prompt template: parentheses become spaces, the commas stay detached
        (
            "(masterpiece), (best quality), (ultra-detailed), a cat.",
            "masterpiece , best quality , ultra-detailed , a cat.",
        ),
        ("Check https://example.com/x and @user123 now", "check and now"),
        ("<b>Bold</b> &amp; text", "bold text"),
        ("this-is-my-cute-cat", "this is my cute cat"),
        ('"A dog"', "a dog"),
        ("photo 1920x1080 of a dog", "photo of a dog"),
        ("Wow...amazing", "wow amazing"),
        ("  many   spaces\there  ", "many spaces here"),
        ("一只猫 walking", "一只猫 walking"),  # CJK unified ideographs are kept (OSP change)
        ("\u31f0\u31f1cat", "cat"),  # katakana phonetic extensions are still removed
        ("", ""),
    ],
)
def test_clean_caption(raw, expected):
    assert clean_caption(raw) == expected


def test_clean_caption_second_pass_matters():
    # Upstream stringifies a one-element list; one pass leaves the quotes, the second strips them.
    assert _clean_once("['A cat']") == "'a cat'"
    assert clean_caption("['A cat']") == "a cat"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_text_encoder(tmp_path_factory.mktemp("text") / "te", seed=0)


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return TextEncoder.from_pretrained(tiny_dir, device="cpu")


def test_empty_caption_is_eos_only(encoder):
    ids, mask = encoder.tokenize([""])
    assert ids.shape == mask.shape == (1, TEXT_MAX_LENGTH)
    assert ids[0, 0] == 1 and ids[0, 1:].eq(0).all()  # [EOS, pad...]
    assert mask[0, 0] == 1 and mask[0, 1:].eq(0).all()
    (row,) = encoder.encode_unpadded([""])
    assert row.shape == (1, encoder.dim)


def test_tokenizer_matches_sentencepiece(tiny_dir, encoder):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_dir / "spiece.model"))
    text = "a red ball bounces over the green field"
    ids, mask = encoder.tokenize([text], pad_to_max=False)
    assert ids[0].tolist() == sp.encode(text) + [1]
    assert mask.all()
    assert len(encoder.tokenizer) <= encoder.model.config.vocab_size


def test_encode_shapes_and_unpadded_rows(encoder):
    captions = ["", "a red ball bounces over the green field", "a cat", "masterpiece , best quality , a dog"]
    emb, mask = encoder.encode(captions)
    assert emb.shape == (4, TEXT_MAX_LENGTH, 64) and mask.shape == (4, TEXT_MAX_LENGTH)
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
    rows = encoder.encode_unpadded(captions)  # padded only to the longest: an independent forward
    for i, row in enumerate(rows):
        n = int(mask[i].sum())
        assert row.shape == (n, 64)
        torch.testing.assert_close(row, emb[i, :n], atol=2e-5, rtol=1e-5)
    # a caption's encoding does not depend on its batch neighbours
    alone, _ = encoder.encode([captions[2]])
    torch.testing.assert_close(alone[0], emb[2], atol=2e-5, rtol=1e-5)
    # different captions give different embeddings
    assert not torch.allclose(rows[1][0], rows[2][0])


def test_tiny_is_deterministic_and_identity(tmp_path, encoder):
    ident = encoder.identity()
    assert ident["d_model"] == 64 and ident["dtype"] == "float32" and ident["max_length"] == TEXT_MAX_LENGTH
    same = TextEncoder.from_pretrained(write_tiny_text_encoder(tmp_path / "same", seed=0), device="cpu").identity()
    other = TextEncoder.from_pretrained(write_tiny_text_encoder(tmp_path / "other", seed=1), device="cpu").identity()
    for key in ("weights_sha256", "tokenizer_sha256", "config_sha256"):
        assert same[key] == ident[key]
    assert other["weights_sha256"] != ident["weights_sha256"]
    assert other["tokenizer_sha256"] == ident["tokenizer_sha256"]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        TextEncoder.from_pretrained(tmp_path / "nope", device="cpu")


# Tricky captions pinned to what upstream's cleaner gives (BeautifulSoup html.parser + ftfy, twice):
# each line fails if either library is dropped or replaced (a regex for bs4, ftfy only when installed).
TRICKY = [
    ("Tom &amp; Jerry &lt;3 &quot;friends&quot;", 'tom jerry <3 "friends"'),  # entities, then "&" is bad punctuation
    ("Caf&eacute; at night &#8212; rain", "café at night - rain"),
    ("A dog&#39;s life", "a dog's life"),
    ("<style>.a{color:red}</style>A red car", "a red car"),  # bs4 drops style text; a tag regex keeps it
    ("<p>A <i>cat</i> sleeping</p><br/>on a mat", "a cat sleepingon a mat"),
    ("5 <3 cats <a href='x'>link</a>", "5 <3 cats link"),
    ("â€œSmart quotesâ€\x9d broken", '"smart quotes" broken'),  # mojibake repaired by ftfy
    ("ＦＵＬＬＷＩＤＴＨ text", "fullwidth text"),  # ftfy folds full-width letters
    ("The cafÃ© in ParÃ­s", "the cafã in parã\xads"),  # lower() runs before ftfy, as upstream: not repaired
    ("Visit www.example.org/page or http://foo.bar/baz today", "visit or foo. bar baz today"),
    ("一只猫在草地上奔跑 a cat runs", "一只猫在草地上奔跑 a cat runs"),
    ("㈱ company logo", "company logo"),  # enclosed CJK (U+3231) removed
    ("video.mp4", ""),  # a file name (bs4 would warn that it looks like one; osp silences that)
]


@pytest.mark.parametrize("raw, expected", TRICKY)
def test_clean_caption_tricky(raw, expected):
    assert clean_caption(raw) == expected


def test_cleaner_identity_names_rules_and_versions():
    from importlib.metadata import version

    ident = cleaner_identity()
    assert ident == {"name": CLEANER_NAME, "ftfy": version("ftfy"), "beautifulsoup4": version("beautifulsoup4")}


def _clean_in_fresh_interpreter(raws: list[str], blocked: tuple[str, ...]):
    """clean_caption in a new interpreter where importing each of `blocked` fails (as if not installed)."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        f"for m in {blocked!r}:\n"
        "    sys.modules[m] = None\n"
        "from osp.common.models.text import clean_caption\n"
        "print(json.dumps([clean_caption(c) for c in json.loads(sys.stdin.read())]))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(raws), capture_output=True, text=True, timeout=120
    )
    return p.returncode, (json.loads(p.stdout) if p.returncode == 0 else p.stderr)


def test_cleaner_does_not_depend_on_what_else_is_installed():
    """Two machines clean the same captions identically: optional parsers and charset detectors that
    bs4 could pick up change nothing, and a machine without ftfy refuses to clean instead of silently
    producing other text (the cache would then depend on the machine)."""
    raws = [raw for raw, _ in TRICKY]
    rc, got = _clean_in_fresh_interpreter(raws, ("lxml", "html5lib", "chardet", "cchardet", "charset_normalizer"))
    assert rc == 0, got
    assert got == [clean_caption(c) for c in raws]
    rc, err = _clean_in_fresh_interpreter(raws, ("ftfy",))
    assert rc != 0 and "ftfy" in err
