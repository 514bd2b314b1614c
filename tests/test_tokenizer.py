"""sdrt's CLIP tokenizer against transformers' CLIPTokenizer on the real CLIP vocabulary.

The vocabulary is the one bundled with sdrt (`sdrt.clip_vocab`), written out as vocab.json/merges.txt for
transformers; where ../shared/clip-tokenizer exists (always in CI) it is also checked to be that file pair
byte for byte. The reference is `transformers.CLIPTokenizer.from_pretrained(folder)` called with
padding="max_length", truncation=True, max_length=77. transformers >= 5 has no pure-Python "slow"
CLIP tokenizer any more (CLIPTokenizer is built on `tokenizers`), so ordinary prompts are also
checked against an independent pure-Python port of OpenAI's simple_tokenizer BPE, with ftfy's
cleaning left out (ftfy is not installed and transformers >= 5 does not use it).

Target run time: under 10 s on a 2-core CPU.
"""
import functools
import gzip
import hashlib
import json
import logging
import random
import unicodedata
from pathlib import Path

import pytest
import torch

from factories import clip_vocabulary
from sdrt.clip_vocab import MERGES_FILE, bundled_vocabulary
from sdrt.errors import InvalidInputError, ModelLoadError
from sdrt.tokenizer import CLIPTokenizer

VOCAB_DIR = clip_vocabulary()
SHARED_VOCAB_DIR = Path(__file__).resolve().parents[2] / "shared" / "clip-tokenizer"

MAX_LEN = 77


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _configs(pad: str) -> dict:
    """tokenizer_config.json / special_tokens_map.json as diffusers SD folders ship them: BOS/EOS/UNK as
    serialized AddedTokens with normalized=true, the pad token as a plain string."""
    specials = {"bos_token": _added_token("<|startoftext|>"), "eos_token": _added_token("<|endoftext|>"),
                "unk_token": _added_token("<|endoftext|>"), "pad_token": pad}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": MAX_LEN,
              "tokenizer_class": "CLIPTokenizer",
              **{k: ({"__type": "AddedToken", **v} if isinstance(v, dict) else v) for k, v in specials.items()}}
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


# name -> config files written next to vocab.json/merges.txt
CONVENTIONS = {
    "bare": {},                              # vocab + merges only: transformers' defaults
    "sd1": _configs("<|endoftext|>"),        # SD 1.x: pads with <|endoftext|>
    "sd2": _configs("!"),                    # SD 2.x: pads with "!" (id 0)
    "sd1_pad_added_token": {name: {**cfg, "pad_token": _added_token("<|endoftext|>")}
                            for name, cfg in _configs("<|endoftext|>").items()},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    out = {}
    for name, files in CONVENTIONS.items():
        folder = tmp_path_factory.mktemp(name)
        for f in ("vocab.json", "merges.txt"):
            (folder / f).symlink_to(VOCAB_DIR / f)
        for f, content in files.items():
            (folder / f).write_text(json.dumps(content, indent=2), encoding="utf-8")
        out[name] = folder
    return out


# ------------------------------------------------------------------------------------------ prompts
WORDS = ["a", "photo", "of", "the", "cat", "Dog", "ASTRONAUT", "riding", "horse", "on", "Mars", "highly",
         "detailed", "4k", "trending", "artstation", "by", "greg", "Rutkowski", "masterpiece", "octane",
         "render", "don't", "it's", "WE'RE", "they'll", "I'd", "you've", "I'm", "rock'n'roll", "x-ray",
         "self-portrait", "e-mail", "JPEG", "iPhone", "McDonald's", "supercalifragilisticexpialidocious"]
UNICODE = ["café", "naïve", "Zürich", "ÅNGSTRÖM", "e\u0301clair", "façade", "straße", "İstanbul", "ΣΊΣΥΦΟΣ",
           "москва", "日本語", "中文字符", "한국어", "東京タワー", "😀", "👩\u200d🚀", "👍🏽", "🇯🇵", "❤️", "™", "½", "²",
           "Ⅻ", "\u200b", "\u00ad", "ﬁ", "Ａｂｃ", "ß", "ǅ", "ẞ", "\u0301", "مرحبا", "שלום", "नमस्ते"]
PUNCT = [",", ".", "!", "!!!", "?", "...", "(", ")", "((masterpiece))", "[", "]", ":", "(cat:1.2)", "-", "--",
         "'", '"', "“quoted”", "&amp;", "#", "@", "$", "%", "^", "*", "_", "+", "=", "~", "`", "|", "<", ">",
         "/", "\\", "{", "}", ";", "'s", "!?"]
SPECIALS = ["<|endoftext|>", "<|ENDOFTEXT|>", "<|startoftext|>", "<|StartOfText|>"]
NUMBERS = ["0", "42", "1999", "3.14159", "1,000,000", "٣", "१२", "007", "1920x1080"]
SEPARATORS = [" "] * 12 + ["", "  ", "\t", "\n", " \n\t ", "\u00a0", "\u3000", "\r\n", "     "]


def _prompts(count: int, seed: int, specials: bool) -> list:
    rng = random.Random(seed)
    pools = [(WORDS, 10), (UNICODE, 3), (PUNCT, 3), (NUMBERS, 2)] + ([(SPECIALS, 1)] if specials else [])
    prompts = []
    for i in range(count):
        n = rng.choice([0, 1, 2, 5, 10, 20, 30]) if i % 10 else rng.randint(60, 140)  # every 10th: > 77 tokens
        parts = []
        for _ in range(n):
            pool = rng.choices([p for p, _ in pools], weights=[w for _, w in pools])[0]
            parts.append(rng.choice(pool))
            parts.append(rng.choice(SEPARATORS))
        text = "".join(parts)
        case = rng.random()
        text = text.upper() if case < 0.1 else text.title() if case < 0.2 else text
        prompts.append(rng.choice(["", " ", "\n"]) + text + rng.choice(["", " ", "  \t"]))
    return prompts


FIXED = ["", " ", "   \n\t  ", "a", "A photo of a cat", "a photo of a cat", "a  photo\tof\na   cat",
         "hello world!!!", "a cat!", "wow!", "!", "!!", "<|endoftext|>", "<|startoftext|>a<|endoftext|>b",
         "a <|ENDOFTEXT|> b", "café CAFÉ cafe\u0301", "日本語のテキスト 😀 naïve", "123456789", "3.14",
         "it's DON'T we're", "a " * 74 + "b", "a " * 75, "a " * 76, "a " * 200, "x" * 300, "🙂" * 100]


# ---------------------------------------------------------------------------------------- reference
def _reference(folder: Path, prompts: list) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return ref(prompts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt").input_ids


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_matches_transformers(folders, convention):
    prompts = FIXED + _prompts(220, seed=1234, specials=True)
    ours = CLIPTokenizer.from_folder(folders[convention])
    expected = _reference(folders[convention], prompts)
    got = ours(prompts)
    assert got.dtype == torch.long and got.shape == (len(prompts), MAX_LEN)
    mismatched = [p for p, a, b in zip(prompts, got, expected) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, first: {mismatched[0]!r}"


def test_pad_conventions(folders):
    cases = {"bare": 49407, "sd1": 49407, "sd2": 0, "sd1_pad_added_token": 49407}
    toks = {convention: CLIPTokenizer.from_folder(folders[convention]) for convention in cases}
    for convention, pad_id in cases.items():
        tok = toks[convention]
        assert tok.pad_token_id == pad_id and tok.model_max_length == MAX_LEN
        ids = tok("a photo of a cat")
        assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert (ids[0, 7:] == pad_id).all()
    # The pad token "!" is a special token, so every "!" becomes id 0 (not the BPE word "!!!</w>").
    assert toks["sd2"]("wow!!!")[0, :6].tolist() == [49406, 2781, 0, 0, 0, 49407]
    assert toks["sd1"]("wow!!!")[0, :4].tolist() == [49406, 2781, 995, 49407]


# ------------------------------------------------------------------------------ bundled vocabulary
# sha256 of `zcat bpe_simple_vocab_16e6.txt.gz | head -n 48895` (open_clip_torch 3.3.0's file = OpenAI CLIP's)
BUNDLED_TEXT_SHA256 = "685491abbdad36159d094ecdc23bebc0dd53f8d1df35c4d74ef6036db2ba7572"


def test_bundled_file_is_the_upstream_prefix():
    text = gzip.decompress(MERGES_FILE.read_bytes())
    assert hashlib.sha256(text).hexdigest() == BUNDLED_TEXT_SHA256
    assert text.startswith(b'"bpe_simple_vocab_16e6.txt#version: 0.2\ni n\nt h\n')


def test_bundled_vocabulary_layout():
    vocab, merges = bundled_vocabulary()
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert len(merges) == 48894 and merges[0] == ("i", "n") and merges[-1] == ("jeky", "ll</w>")
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512 and vocab["jekyll</w>"] == 49405
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["a</w>"] == 320 and vocab["photo</w>"] == 1125 and vocab["cat</w>"] == 2368


def test_bundled_vocabulary_equals_the_shared_files():
    """The bundled data written out is byte for byte the Hub's vocab.json/merges.txt kept in ../shared."""
    if not (SHARED_VOCAB_DIR / "vocab.json").is_file():
        pytest.skip(f"no reference CLIP vocabulary at {SHARED_VOCAB_DIR} (../shared is missing)")
    for name in ("vocab.json", "merges.txt"):
        assert (VOCAB_DIR / name).read_bytes() == (SHARED_VOCAB_DIR / name).read_bytes(), name


@pytest.mark.parametrize("family,pad", [("sd1", "<|endoftext|>"), ("sd2", "!")])
def test_bundled_matches_transformers(folders, family, pad):
    """CLIPTokenizer.bundled(pad_token) = transformers on an SD release's tokenizer folder, special tokens included."""
    prompts = FIXED + _prompts(220, seed=4321, specials=True)
    got = CLIPTokenizer.bundled(pad_token=pad)(prompts)
    expected = _reference(folders[family], prompts)
    mismatched = [p for p, a, b in zip(prompts, got, expected) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, first: {mismatched[0]!r}"


def test_bundled_pad_tokens_and_copies():
    sd1, sd2 = CLIPTokenizer.bundled(), CLIPTokenizer.bundled(pad_token="!")
    assert (sd1.pad_token_id, sd2.pad_token_id) == (49407, 0)
    assert sd1.vocab_size == sd2.vocab_size == 49408 and sd1.model_max_length == 77
    assert sd1("a cat")[0, :5].tolist() == [49406, 320, 2368, 49407, 49407]
    assert sd2("a cat")[0, :5].tolist() == [49406, 320, 2368, 49407, 0]
    # each call gives its own object: changing one leaves the next untouched
    sd1.model_max_length = 10
    assert CLIPTokenizer.bundled()("a cat").shape == (1, MAX_LEN)
    for bad in ("<|pad|>", None, 0):
        with pytest.raises(InvalidInputError, match="pad_token"):
            CLIPTokenizer.bundled(pad_token=bad)


# --------------------------------------------------------------- independent pure-Python reference
@functools.lru_cache(maxsize=1)
def _openai_bpe_tables():
    vocab = json.loads((VOCAB_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (VOCAB_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    ranks = {tuple(line.split()): i for i, line in enumerate(l for l in lines if l)}
    # GPT-2's reversible byte -> printable character table
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    byte_chars = dict(zip(keep + extra, map(chr, keep + [256 + i for i in range(len(extra))])))
    return vocab, ranks, byte_chars


def _openai_encode(text: str) -> list:
    """OpenAI CLIP simple_tokenizer.encode (without ftfy, lowercasing per character), with BOS/EOS,
    truncation and padding."""
    regex = pytest.importorskip("regex")
    vocab, ranks, byte_chars = _openai_bpe_tables()
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text))
    # Per character, as `tokenizers` (hence transformers >= 5) lowercases: str.lower() would apply
    # Unicode's final-sigma rule ("ΟΔΟΣ" -> "οδος" with ς), which OpenAI's tokenizer does and they don't.
    text = "".join(c.lower() for c in text)
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    ids = [vocab["<|startoftext|>"]]
    for piece in regex.findall(pattern, text):
        piece = "".join(byte_chars[b] for b in piece.encode("utf-8"))
        word = tuple(piece[:-1]) + (piece[-1] + "</w>",)
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        ids.extend(vocab[w] for w in word)
    ids = ids[:MAX_LEN - 1] + [vocab["<|endoftext|>"]]
    return ids + [vocab["<|endoftext|>"]] * (MAX_LEN - len(ids))


def test_matches_openai_bpe_algorithm(folders):
    """Prompts without special-token strings, where the `tokenizers` pipeline and OpenAI's loop must agree."""
    prompts = [p for p in FIXED if "<|" not in p] + _prompts(200, seed=99, specials=False)
    got = CLIPTokenizer.from_folder(folders["bare"])(prompts)
    mismatched = [p for p, row in zip(prompts, got) if row.tolist() != _openai_encode(p)]
    assert not mismatched, f"{len(mismatched)} prompts differ, first: {mismatched[0]!r}"


# ----------------------------------------------------------------------------- truncation, errors
def test_truncation_warns_with_dropped_count(folders, caplog):
    tok = CLIPTokenizer.from_folder(folders["sd1"])
    with caplog.at_level(logging.WARNING, logger="sdrt.tokenizer"):
        ids = tok(["a " * 75, "a " * 80 + "b"])  # 77 tokens: fits; 83 tokens: 6 dropped
    assert ids[0].tolist() == [49406] + [320] * 75 + [49407]
    assert ids[1].tolist() == [49406] + [320] * 75 + [49407]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "prompt 1" in warnings[0].getMessage() and "last 6 tokens are dropped" in warnings[0].getMessage()


def test_single_string_and_bad_prompts(folders):
    tok = CLIPTokenizer.from_folder(folders["bare"])
    assert torch.equal(tok("a cat"), tok(["a cat"]))
    assert tok([]).shape == (0, MAX_LEN)
    for bad in (None, 3, ["a", 3], b"a cat"):
        with pytest.raises(InvalidInputError, match="prompts"):
            tok(bad)


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("case,file", [
    ("missing vocab", "vocab.json"),
    ("missing merges", "merges.txt"),
    ("vocab not json", "vocab.json"),
    ("vocab not a mapping", "vocab.json"),
    ("merges malformed", "merges.txt"),
    ("merges not utf-8", "merges.txt"),
    ("config not json", "tokenizer_config.json"),
    ("pad not in vocab", "tokenizer_config.json"),
])
def test_load_errors_name_the_file(folders, tmp_path, case, file):
    folder = _copy_folder(folders["sd2"], tmp_path / "tokenizer")
    target = folder / file
    if case.startswith("missing"):
        target.unlink()
    elif case == "vocab not json":
        target.write_text('{"a": 1,', encoding="utf-8")
    elif case == "vocab not a mapping":
        target.write_text('["a", "b"]', encoding="utf-8")
    elif case == "merges malformed":
        target.write_text("#version: 0.2\ni n\nthis line has three\n", encoding="utf-8")
    elif case == "merges not utf-8":
        target.write_bytes(b"#version: 0.2\n\xff\xfe n\n")
    elif case == "config not json":
        target.write_text("{", encoding="utf-8")
    elif case == "pad not in vocab":
        target.write_text(json.dumps({"pad_token": "<|pad|>", "model_max_length": 77}), encoding="utf-8")
        (folder / "special_tokens_map.json").unlink()
    with pytest.raises(ModelLoadError) as info:
        CLIPTokenizer.from_folder(folder)
    expected = "pad_token '<|pad|>'" if case == "pad not in vocab" else str(target)
    assert expected in str(info.value)
    if case == "merges malformed":
        assert "line 3" in str(info.value)


def test_unlimited_model_max_length_means_77(folders, tmp_path):
    """transformers saves int(1e30) when a tokenizer has no limit; that must not mean 1e30 columns."""
    folder = _copy_folder(folders["bare"], tmp_path / "tokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}), encoding="utf-8")
    assert CLIPTokenizer.from_folder(folder)("a cat").shape == (1, MAX_LEN)


def test_tokenizer_json_only_folder(folders, tmp_path):
    """transformers >= 5 saves a tokenizer folder with tokenizer.json and no vocab.json/merges.txt."""
    transformers = pytest.importorskip("transformers")
    transformers.CLIPTokenizer.from_pretrained(str(folders["sd1"])).save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    prompts = FIXED + _prompts(40, seed=7, specials=False)
    assert torch.equal(CLIPTokenizer.from_folder(tmp_path)(prompts), CLIPTokenizer.from_folder(folders["sd1"])(prompts))
