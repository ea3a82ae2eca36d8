"""Settings in one place: defaults, overridden by ``QA_*`` environment variables, then by CLI flags."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from qa_app.models.loading import ASSETS_DIR


@dataclass(frozen=True)
class Settings:
    kb_dir: Path = ASSETS_DIR / "kb"
    text_encoder: str = "text-encoder"   # all-MiniLM-L6-v2 fine-tuned by qa-app train-encoder
    ranker: str | None = "ranker-l3"     # None: rank by bi-encoder cosine alone; "ranker": the 6-layer teacher
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    index_kind: str = "flat"             # flat | ivf | hnsw
    recall_k: int = 48                   # KB questions fetched from faiss per query
    rank_k: int = 4                      # distinct entries the ranker reads per query
    threshold: float | None = None       # accept when confidence >= threshold; None: the ranker's calibrated default
    max_query_chars: int = 500           # longer text is truncated with a warning
    spelling: bool = True
    cuda_graphs: bool = True             # on CUDA, replay the text models from CUDA graphs per shape bucket
    fast_kernels: bool = True            # on CUDA, run the models on the FP16 Triton kernels (padding-free)
    cpu_int8: bool = True                # on CPU, run the ranker with dynamic INT8 Linear layers (~4x faster)
    speech_mode: str = "vectoriser"      # vectoriser (wav2vec2 straight into the text space) | asr (whisper + text path)
    speech_encoder: str | None = "speech-encoder"  # wav2vec2 vectoriser for spoken questions; loaded on first use
    asr_model: str = "whisper-base"      # for speech_mode asr: bundled whisper-base (asr extra) or a CTranslate2 folder
    speech_threshold: float | None = None  # accept spoken answers at this confidence; None: calibrated default
    max_utterance_s: float = 15.0        # longer speech is refused (the endpointer cuts streams here)
    # gRPC server
    host: str = "127.0.0.1"              # loopback unless told otherwise
    port: int = 50051
    workers: int = 0                     # threads for the CPU stages (normalise, spell, tokenise, recall); 0: up to 4
    max_queue: int = 512                 # requests in flight; more get RESOURCE_EXHAUSTED
    max_batch_size: int = 0              # requests per model call (dynamic batching); 1 turns batching off; 0: per device
    max_queue_delay_ms: float = 0.0      # how long a lone request waits for others (0: batch what queued while the
                                         # model was busy; on the H100 2 ms only added latency at low load)
    max_batch_tokens: int = 0            # padded tokens (rows x longest) per text-encoder or ranker call; 0: per device
    max_batch_audio_s: float = 240.0     # padded seconds of audio per speech-encoder call
    max_text_chars: int = 10_000         # longer questions are INVALID_ARGUMENT (the engine truncates shorter ones)
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_streams: int = 1024   # HTTP/2 streams per connection
    auth_token: str | None = None        # when set, every call needs "authorization: Bearer <token>"
    tls_cert: Path | None = None         # PEM certificate chain and key: serve TLS instead of plaintext
    tls_key: Path | None = None
    shutdown_grace_s: float = 10.0       # on SIGTERM/SIGINT, time in-flight requests get to finish
    metrics_port: int | None = None      # Prometheus /metrics over HTTP on this port (0: any free one)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "Settings":
        """Defaults, then ``QA_<FIELD>`` variables (``QA_RANK_K=8``), then explicit overrides (not None)."""
        environ = os.environ if environ is None else environ
        values: dict = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f"QA_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f.name, raw, f.default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(name: str, raw: str, default):
    try:
        if name in ("threshold", "shutdown_grace_s", "speech_threshold", "max_utterance_s", "max_queue_delay_ms",
                    "max_batch_audio_s"):
            return float(raw)
        if name in ("tls_cert", "tls_key"):
            return Path(raw)
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int) or name == "metrics_port":
            return int(raw)
        if isinstance(default, Path):
            return Path(raw)
        if name in ("ranker", "speech_encoder") and raw.lower() in ("", "none"):
            return None
        return raw
    except ValueError:
        raise ValueError(f"QA_{name.upper()}={raw!r} is not a valid value") from None
