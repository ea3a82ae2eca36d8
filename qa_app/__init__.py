"""qa_app: real-time question answering for game NPCs."""
from qa_app.kb import KnowledgeBase, KnowledgeBaseError, load_kb, load_kb_dir

__all__ = ["Answer", "Candidate", "QAEngine", "QueryError", "UnknownNpcError", "KnowledgeBase",
           "KnowledgeBaseError", "load_kb", "load_kb_dir"]
_ENGINE_NAMES = ("Answer", "Candidate", "QAEngine", "QueryError", "UnknownNpcError")


def __getattr__(name: str):
    # The engine (faiss, spelling, ranking) loads on first use, so training jobs that only need the models
    # (the speech vectoriser on a GPU box without faiss) import none of it.
    if name in _ENGINE_NAMES:
        from qa_app import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'qa_app' has no attribute {name!r}")
