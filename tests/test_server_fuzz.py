"""Random and malformed requests never take the server down (bounded hypothesis runs)."""
import grpc
from hypothesis import HealthCheck, given, settings, strategies as st

from qa_app.proto import npc_qa_pb2 as pb

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL,
           grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(npc=st.sampled_from(["innkeeper", "quartermaster", ""]) | st.text(max_size=40),
       text=st.text(max_size=3000), top_k=st.integers(0, 2**32 - 1), debug=st.booleans())
def test_random_questions_get_an_answer_or_a_clear_status(client, npc, text, top_k, debug):
    try:
        answer = client.ask(npc, text, top_k=top_k, debug=debug)
        assert 0.0 <= answer.confidence <= 1.0
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details())


@FUZZ
@given(payload=st.binary(max_size=2000))
def test_random_bytes_on_the_wire_are_refused(server, payload):
    with grpc.insecure_channel(server[0]) as channel:
        for method in ("/npcqa.v1.NpcQA/Ask", "/npcqa.v1.NpcQA/ReloadKnowledgeBase"):
            raw = channel.unary_unary(method)  # no serializers: the bytes go out as they are
            try:
                raw(payload, timeout=30)
            except grpc.RpcError as err:
                assert err.code() in ALLOWED | {grpc.StatusCode.UNKNOWN}, (err.code(), err.details())


@FUZZ
@given(chunks=st.lists(st.binary(max_size=4096), max_size=6))
def test_random_audio_and_streams_cut_short_leave_the_server_up(server, chunks):
    with grpc.insecure_channel(server[0]) as channel:
        talk = channel.stream_stream("/npcqa.v1.NpcQA/Talk", request_serializer=pb.TalkRequest.SerializeToString,
                                     response_deserializer=pb.TalkEvent.FromString)
        try:
            list(talk(iter([pb.TalkRequest(audio=c) for c in chunks]), timeout=30))
        except grpc.RpcError as err:
            assert err.code() in ALLOWED, (err.code(), err.details())
        chat = channel.stream_stream("/npcqa.v1.NpcQA/Chat", request_serializer=pb.AskRequest.SerializeToString,
                                     response_deserializer=pb.Answer.FromString)
        call = chat(iter([pb.AskRequest(npc="innkeeper", text="room price?")] * 3), timeout=30)
        next(call)
        call.cancel()  # the client walks away mid-stream


def test_server_still_answers_after_the_fuzzing(client):
    assert client.ask("innkeeper", "where can i buy a horse").id == "buy_horse"
