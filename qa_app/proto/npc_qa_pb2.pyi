from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    PCM16: _ClassVar[AudioEncoding]
    FLOAT32: _ClassVar[AudioEncoding]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
PCM16: AudioEncoding
FLOAT32: AudioEncoding

class AskRequest(_message.Message):
    __slots__ = ("npc", "player_id", "text", "top_k", "debug")
    NPC_FIELD_NUMBER: _ClassVar[int]
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    npc: str
    player_id: str
    text: str
    top_k: int
    debug: bool
    def __init__(self, npc: _Optional[str] = ..., player_id: _Optional[str] = ..., text: _Optional[str] = ..., top_k: _Optional[int] = ..., debug: _Optional[bool] = ...) -> None: ...

class Entity(_message.Message):
    __slots__ = ("name", "text", "score", "entry_ids")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    text: str
    score: float
    entry_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., entry_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("id", "question", "recall_score", "answer_score", "ranker_logit", "rank_score")
    ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    RECALL_SCORE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_SCORE_FIELD_NUMBER: _ClassVar[int]
    RANKER_LOGIT_FIELD_NUMBER: _ClassVar[int]
    RANK_SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    question: str
    recall_score: float
    answer_score: float
    ranker_logit: float
    rank_score: float
    def __init__(self, id: _Optional[str] = ..., question: _Optional[str] = ..., recall_score: _Optional[float] = ..., answer_score: _Optional[float] = ..., ranker_logit: _Optional[float] = ..., rank_score: _Optional[float] = ...) -> None: ...

class Answer(_message.Message):
    __slots__ = ("id", "text", "confidence", "rejected", "entities", "candidates", "timings_ms", "normalized_query", "npc", "warnings", "request_id")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_QUERY_FIELD_NUMBER: _ClassVar[int]
    NPC_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    confidence: float
    rejected: bool
    entities: _containers.RepeatedCompositeFieldContainer[Entity]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    timings_ms: _containers.ScalarMap[str, float]
    normalized_query: str
    npc: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., confidence: _Optional[float] = ..., rejected: _Optional[bool] = ..., entities: _Optional[_Iterable[_Union[Entity, _Mapping]]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., normalized_query: _Optional[str] = ..., npc: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class TalkConfig(_message.Message):
    __slots__ = ("npc", "player_id", "sample_rate", "encoding", "channels")
    NPC_FIELD_NUMBER: _ClassVar[int]
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    npc: str
    player_id: str
    sample_rate: int
    encoding: AudioEncoding
    channels: int
    def __init__(self, npc: _Optional[str] = ..., player_id: _Optional[str] = ..., sample_rate: _Optional[int] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ..., channels: _Optional[int] = ...) -> None: ...

class TalkRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: TalkConfig
    audio: bytes
    def __init__(self, config: _Optional[_Union[TalkConfig, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class SpeechStarted(_message.Message):
    __slots__ = ("at_seconds",)
    AT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    at_seconds: float
    def __init__(self, at_seconds: _Optional[float] = ...) -> None: ...

class SpeechEnded(_message.Message):
    __slots__ = ("at_seconds", "duration_seconds")
    AT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    at_seconds: float
    duration_seconds: float
    def __init__(self, at_seconds: _Optional[float] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class TalkEvent(_message.Message):
    __slots__ = ("speech_started", "speech_ended", "answer")
    SPEECH_STARTED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_ENDED_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    speech_started: SpeechStarted
    speech_ended: SpeechEnded
    answer: Answer
    def __init__(self, speech_started: _Optional[_Union[SpeechStarted, _Mapping]] = ..., speech_ended: _Optional[_Union[SpeechEnded, _Mapping]] = ..., answer: _Optional[_Union[Answer, _Mapping]] = ...) -> None: ...

class ListNpcsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NpcInfo(_message.Message):
    __slots__ = ("name", "entries", "questions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    entries: int
    questions: int
    def __init__(self, name: _Optional[str] = ..., entries: _Optional[int] = ..., questions: _Optional[int] = ...) -> None: ...

class ListNpcsResponse(_message.Message):
    __slots__ = ("npcs",)
    NPCS_FIELD_NUMBER: _ClassVar[int]
    npcs: _containers.RepeatedCompositeFieldContainer[NpcInfo]
    def __init__(self, npcs: _Optional[_Iterable[_Union[NpcInfo, _Mapping]]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("npc",)
    NPC_FIELD_NUMBER: _ClassVar[int]
    npc: str
    def __init__(self, npc: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("npc", "build_ms")
    NPC_FIELD_NUMBER: _ClassVar[int]
    BUILD_MS_FIELD_NUMBER: _ClassVar[int]
    npc: NpcInfo
    build_ms: float
    def __init__(self, npc: _Optional[_Union[NpcInfo, _Mapping]] = ..., build_ms: _Optional[float] = ...) -> None: ...
