from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]
    PRIORITY_NORMAL: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]

class Truncation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_UNSPECIFIED: _ClassVar[Truncation]
    TRUNCATION_HEAD_TAIL: _ClassVar[Truncation]
    TRUNCATION_HEAD: _ClassVar[Truncation]
    TRUNCATION_TAIL: _ClassVar[Truncation]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    SHIP: _ClassVar[Decision]
    ESCALATE: _ClassVar[Decision]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LOW: Priority
PRIORITY_NORMAL: Priority
PRIORITY_HIGH: Priority
TRUNCATION_UNSPECIFIED: Truncation
TRUNCATION_HEAD_TAIL: Truncation
TRUNCATION_HEAD: Truncation
TRUNCATION_TAIL: Truncation
DECISION_UNSPECIFIED: Decision
SHIP: Decision
ESCALATE: Decision

class FeedbackRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "model", "score", "answer")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    model: str
    score: float
    answer: str
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., model: _Optional[str] = ..., score: _Optional[float] = ..., answer: _Optional[str] = ...) -> None: ...

class FeedbackReply(_message.Message):
    __slots__ = ("accepted", "errors")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    errors: _containers.RepeatedCompositeFieldContainer[StreamError]
    def __init__(self, accepted: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[StreamError, _Mapping]]] = ...) -> None: ...

class RefitRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RefitReply(_message.Message):
    __slots__ = ("models", "revision")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    models: int
    revision: str
    def __init__(self, models: _Optional[int] = ..., revision: _Optional[str] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadReply(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: str
    def __init__(self, revision: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Messages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("quality_floor", "max_cost_usd", "cost_weight", "relative_floor")
    QUALITY_FLOOR_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_FIELD_NUMBER: _ClassVar[int]
    COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_FLOOR_FIELD_NUMBER: _ClassVar[int]
    quality_floor: float
    max_cost_usd: float
    cost_weight: float
    relative_floor: float
    def __init__(self, quality_floor: _Optional[float] = ..., max_cost_usd: _Optional[float] = ..., cost_weight: _Optional[float] = ..., relative_floor: _Optional[float] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "messages", "candidates", "policy", "priority", "truncation", "expected_output_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    messages: Messages
    candidates: _containers.RepeatedScalarFieldContainer[str]
    policy: Policy
    priority: Priority
    truncation: Truncation
    expected_output_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[Messages, _Mapping]] = ..., candidates: _Optional[_Iterable[str]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., priority: _Optional[_Union[Priority, str]] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., expected_output_tokens: _Optional[int] = ...) -> None: ...

class CandidateScore(_message.Message):
    __slots__ = ("model", "p_pass", "expected_cost_usd", "params")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    P_PASS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_COST_USD_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    model: str
    p_pass: float
    expected_cost_usd: float
    params: str
    def __init__(self, model: _Optional[str] = ..., p_pass: _Optional[float] = ..., expected_cost_usd: _Optional[float] = ..., params: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("tokenize_ms", "queue_ms", "inference_ms", "total_ms")
    TOKENIZE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    tokenize_ms: float
    queue_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, tokenize_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class RouteReply(_message.Message):
    __slots__ = ("request_id", "model", "candidates", "expected_cost_usd", "expected_saving_usd", "margin", "verify_recommended", "truncated", "input_tokens", "revision", "timings", "reason", "fast_path")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_COST_USD_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SAVING_USD_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    VERIFY_RECOMMENDED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FAST_PATH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateScore]
    expected_cost_usd: float
    expected_saving_usd: float
    margin: float
    verify_recommended: bool
    truncated: bool
    input_tokens: int
    revision: str
    timings: Timings
    reason: str
    fast_path: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[CandidateScore, _Mapping]]] = ..., expected_cost_usd: _Optional[float] = ..., expected_saving_usd: _Optional[float] = ..., margin: _Optional[float] = ..., verify_recommended: _Optional[bool] = ..., truncated: _Optional[bool] = ..., input_tokens: _Optional[int] = ..., revision: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., reason: _Optional[str] = ..., fast_path: _Optional[bool] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "answer", "model", "policy", "priority", "candidates", "peers", "peer_threshold", "messages", "expected_output_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    PEER_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    answer: str
    model: str
    policy: Policy
    priority: Priority
    candidates: _containers.RepeatedScalarFieldContainer[str]
    peers: _containers.RepeatedCompositeFieldContainer[PeerAnswer]
    peer_threshold: float
    messages: Messages
    expected_output_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., answer: _Optional[str] = ..., model: _Optional[str] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., priority: _Optional[_Union[Priority, str]] = ..., candidates: _Optional[_Iterable[str]] = ..., peers: _Optional[_Iterable[_Union[PeerAnswer, _Mapping]]] = ..., peer_threshold: _Optional[float] = ..., messages: _Optional[_Union[Messages, _Mapping]] = ..., expected_output_tokens: _Optional[int] = ...) -> None: ...

class PeerAnswer(_message.Message):
    __slots__ = ("model", "answer")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    model: str
    answer: str
    def __init__(self, model: _Optional[str] = ..., answer: _Optional[str] = ...) -> None: ...

class VerifyReply(_message.Message):
    __slots__ = ("request_id", "p_pass", "decision", "escalate_to", "threshold", "truncated", "input_tokens", "revision", "timings", "peers_compared", "peers_agreeing")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    P_PASS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ESCALATE_TO_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PEERS_COMPARED_FIELD_NUMBER: _ClassVar[int]
    PEERS_AGREEING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    p_pass: float
    decision: Decision
    escalate_to: str
    threshold: float
    truncated: bool
    input_tokens: int
    revision: str
    timings: Timings
    peers_compared: int
    peers_agreeing: int
    def __init__(self, request_id: _Optional[str] = ..., p_pass: _Optional[float] = ..., decision: _Optional[_Union[Decision, str]] = ..., escalate_to: _Optional[str] = ..., threshold: _Optional[float] = ..., truncated: _Optional[bool] = ..., input_tokens: _Optional[int] = ..., revision: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., peers_compared: _Optional[int] = ..., peers_agreeing: _Optional[int] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("request_id", "code", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    message: str
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RouteStreamReply(_message.Message):
    __slots__ = ("reply", "error")
    REPLY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    reply: RouteReply
    error: StreamError
    def __init__(self, reply: _Optional[_Union[RouteReply, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class VerifyStreamReply(_message.Message):
    __slots__ = ("reply", "error")
    REPLY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    reply: VerifyReply
    error: StreamError
    def __init__(self, reply: _Optional[_Union[VerifyReply, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_batch_tokens", "max_batch_requests", "max_queue", "max_input_tokens", "max_input_bytes")
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_batch_tokens: int
    max_batch_requests: int
    max_queue: int
    max_input_tokens: int
    max_input_bytes: int
    def __init__(self, max_batch_tokens: _Optional[int] = ..., max_batch_requests: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_input_tokens: _Optional[int] = ..., max_input_bytes: _Optional[int] = ...) -> None: ...

class CatalogEntry(_message.Message):
    __slots__ = ("model", "in_usd_per_mtok", "out_usd_per_mtok", "head", "expected_output_tokens", "params")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IN_USD_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    OUT_USD_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    model: str
    in_usd_per_mtok: float
    out_usd_per_mtok: float
    head: str
    expected_output_tokens: int
    params: str
    def __init__(self, model: _Optional[str] = ..., in_usd_per_mtok: _Optional[float] = ..., out_usd_per_mtok: _Optional[float] = ..., head: _Optional[str] = ..., expected_output_tokens: _Optional[int] = ..., params: _Optional[str] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("version", "model_revision", "heads_revision", "backend", "limits", "catalog", "default_quality_floor", "default_verify_threshold", "numerics", "default_relative_floor")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    HEADS_REVISION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_QUALITY_FLOOR_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERIFY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NUMERICS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RELATIVE_FLOOR_FIELD_NUMBER: _ClassVar[int]
    version: str
    model_revision: str
    heads_revision: str
    backend: str
    limits: Limits
    catalog: _containers.RepeatedCompositeFieldContainer[CatalogEntry]
    default_quality_floor: float
    default_verify_threshold: float
    numerics: str
    default_relative_floor: float
    def __init__(self, version: _Optional[str] = ..., model_revision: _Optional[str] = ..., heads_revision: _Optional[str] = ..., backend: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., catalog: _Optional[_Iterable[_Union[CatalogEntry, _Mapping]]] = ..., default_quality_floor: _Optional[float] = ..., default_verify_threshold: _Optional[float] = ..., numerics: _Optional[str] = ..., default_relative_floor: _Optional[float] = ...) -> None: ...
