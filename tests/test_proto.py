"""The committed gRPC code is what qa_app/proto/generate.py makes from protos/npc_qa.proto."""
from conftest import ROOT
from qa_app.proto.generate import generate


def test_generated_code_is_current(tmp_path):
    fresh = {p.name: p.read_text() for p in generate(tmp_path)}
    committed = {p.name: p.read_text() for p in (ROOT / "qa_app" / "proto").glob("npc_qa_pb2*")}
    assert fresh.keys() == committed.keys()
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"regenerate with: python -m qa_app.proto.generate ({', '.join(stale)} stale)"
