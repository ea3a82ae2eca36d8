"""qa_app: real-time question answering for game NPCs."""
from qa_app.engine import Answer, Candidate, QAEngine, QueryError, UnknownNpcError
from qa_app.kb import KnowledgeBase, KnowledgeBaseError, load_kb, load_kb_dir

__all__ = ["Answer", "Candidate", "QAEngine", "QueryError", "UnknownNpcError", "KnowledgeBase",
           "KnowledgeBaseError", "load_kb", "load_kb_dir"]
