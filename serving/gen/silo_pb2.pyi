from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerationParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "mode", "k", "lmbda", "tau", "return_attributions", "max_verbatim_chars", "exclude_owners", "exclude_tiers", "require_notices", "ric_retriever", "ric_blocks", "logprobs", "echo")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    LMBDA_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    RETURN_ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_VERBATIM_CHARS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_OWNERS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_TIERS_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_NOTICES_FIELD_NUMBER: _ClassVar[int]
    RIC_RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    RIC_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ECHO_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    mode: str
    k: int
    lmbda: float
    tau: float
    return_attributions: bool
    max_verbatim_chars: int
    exclude_owners: _containers.RepeatedScalarFieldContainer[str]
    exclude_tiers: _containers.RepeatedScalarFieldContainer[str]
    require_notices: bool
    ric_retriever: str
    ric_blocks: int
    logprobs: int
    echo: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., mode: _Optional[str] = ..., k: _Optional[int] = ..., lmbda: _Optional[float] = ..., tau: _Optional[float] = ..., return_attributions: _Optional[bool] = ..., max_verbatim_chars: _Optional[int] = ..., exclude_owners: _Optional[_Iterable[str]] = ..., exclude_tiers: _Optional[_Iterable[str]] = ..., require_notices: _Optional[bool] = ..., ric_retriever: _Optional[str] = ..., ric_blocks: _Optional[int] = ..., logprobs: _Optional[int] = ..., echo: _Optional[bool] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("prompt", "params", "prompt_ids")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    params: GenerationParams
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt: _Optional[str] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ..., prompt_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("messages", "params")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    params: GenerationParams
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class AttributionSource(_message.Message):
    __slots__ = ("owner", "document_id", "title", "license", "shard", "sentence", "share", "source", "url")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    owner: str
    document_id: str
    title: str
    license: str
    shard: str
    sentence: str
    share: float
    source: str
    url: str
    def __init__(self, owner: _Optional[str] = ..., document_id: _Optional[str] = ..., title: _Optional[str] = ..., license: _Optional[str] = ..., shard: _Optional[str] = ..., sentence: _Optional[str] = ..., share: _Optional[float] = ..., source: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class VerbatimSpan(_message.Message):
    __slots__ = ("document_id", "owner", "shard", "start", "end", "doc_start", "doc_end")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DOC_START_FIELD_NUMBER: _ClassVar[int]
    DOC_END_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    owner: str
    shard: str
    start: int
    end: int
    doc_start: int
    doc_end: int
    def __init__(self, document_id: _Optional[str] = ..., owner: _Optional[str] = ..., shard: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., doc_start: _Optional[int] = ..., doc_end: _Optional[int] = ...) -> None: ...

class SentenceAttribution(_message.Message):
    __slots__ = ("sentence", "start", "end", "parametric_share", "sources", "other_share", "spans", "tokens", "training")
    SENTENCE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PARAMETRIC_SHARE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    OTHER_SHARE_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    sentence: str
    start: int
    end: int
    parametric_share: float
    sources: _containers.RepeatedCompositeFieldContainer[AttributionSource]
    other_share: float
    spans: _containers.RepeatedCompositeFieldContainer[VerbatimSpan]
    tokens: int
    training: _containers.RepeatedCompositeFieldContainer[TrainingSpan]
    def __init__(self, sentence: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., parametric_share: _Optional[float] = ..., sources: _Optional[_Iterable[_Union[AttributionSource, _Mapping]]] = ..., other_share: _Optional[float] = ..., spans: _Optional[_Iterable[_Union[VerbatimSpan, _Mapping]]] = ..., tokens: _Optional[int] = ..., training: _Optional[_Iterable[_Union[TrainingSpan, _Mapping]]] = ...) -> None: ...

class TrainingSpan(_message.Message):
    __slots__ = ("document_id", "owner", "license", "title", "source", "url", "tier", "start", "end", "doc_start", "doc_end", "count")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DOC_START_FIELD_NUMBER: _ClassVar[int]
    DOC_END_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    owner: str
    license: str
    title: str
    source: str
    url: str
    tier: str
    start: int
    end: int
    doc_start: int
    doc_end: int
    count: int
    def __init__(self, document_id: _Optional[str] = ..., owner: _Optional[str] = ..., license: _Optional[str] = ..., title: _Optional[str] = ..., source: _Optional[str] = ..., url: _Optional[str] = ..., tier: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., doc_start: _Optional[int] = ..., doc_end: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class LicenseNotice(_message.Message):
    __slots__ = ("document_id", "title", "owner", "license", "source", "url", "share", "text", "origin")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    title: str
    owner: str
    license: str
    source: str
    url: str
    share: float
    text: str
    origin: str
    def __init__(self, document_id: _Optional[str] = ..., title: _Optional[str] = ..., owner: _Optional[str] = ..., license: _Optional[str] = ..., source: _Optional[str] = ..., url: _Optional[str] = ..., share: _Optional[float] = ..., text: _Optional[str] = ..., origin: _Optional[str] = ...) -> None: ...

class GuardEvent(_message.Message):
    __slots__ = ("offset", "document_id", "owner", "shard", "span", "cap", "blocked_tokens", "blocked_mass")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    CAP_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_MASS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    document_id: str
    owner: str
    shard: str
    span: int
    cap: int
    blocked_tokens: int
    blocked_mass: float
    def __init__(self, offset: _Optional[int] = ..., document_id: _Optional[str] = ..., owner: _Optional[str] = ..., shard: _Optional[str] = ..., span: _Optional[int] = ..., cap: _Optional[int] = ..., blocked_tokens: _Optional[int] = ..., blocked_mass: _Optional[float] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("id", "text", "logprob")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("id", "text", "logprob", "logprob_parametric", "lmbda", "offset", "top")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_PARAMETRIC_FIELD_NUMBER: _ClassVar[int]
    LMBDA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    logprob_parametric: float
    lmbda: float
    offset: int
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., logprob_parametric: _Optional[float] = ..., lmbda: _Optional[float] = ..., offset: _Optional[int] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "usage", "attributions", "store_generation", "mode", "request_id", "notices", "guard_events", "logprobs", "prompt_logprobs", "prompt_text")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    STORE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NOTICES_FIELD_NUMBER: _ClassVar[int]
    GUARD_EVENTS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: str
    usage: Usage
    attributions: _containers.RepeatedCompositeFieldContainer[SentenceAttribution]
    store_generation: int
    mode: str
    request_id: str
    notices: _containers.RepeatedCompositeFieldContainer[LicenseNotice]
    guard_events: _containers.RepeatedCompositeFieldContainer[GuardEvent]
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_text: str
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., attributions: _Optional[_Iterable[_Union[SentenceAttribution, _Mapping]]] = ..., store_generation: _Optional[int] = ..., mode: _Optional[str] = ..., request_id: _Optional[str] = ..., notices: _Optional[_Iterable[_Union[LicenseNotice, _Mapping]]] = ..., guard_events: _Optional[_Iterable[_Union[GuardEvent, _Mapping]]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_text: _Optional[str] = ...) -> None: ...

class CompleteChunk(_message.Message):
    __slots__ = ("delta", "done", "logprobs")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    delta: str
    done: CompleteResponse
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, delta: _Optional[str] = ..., done: _Optional[_Union[CompleteResponse, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("text", "mode", "k", "lmbda", "tau")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    LMBDA_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    text: str
    mode: str
    k: int
    lmbda: float
    tau: float
    def __init__(self, text: _Optional[str] = ..., mode: _Optional[str] = ..., k: _Optional[int] = ..., lmbda: _Optional[float] = ..., tau: _Optional[float] = ...) -> None: ...

class TokenScore(_message.Message):
    __slots__ = ("id", "text", "logprob_parametric", "logprob", "lmbda")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_PARAMETRIC_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    LMBDA_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob_parametric: float
    logprob: float
    lmbda: float
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob_parametric: _Optional[float] = ..., logprob: _Optional[float] = ..., lmbda: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("tokens", "perplexity", "perplexity_parametric", "mode", "store_generation")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_PARAMETRIC_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STORE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenScore]
    perplexity: float
    perplexity_parametric: float
    mode: str
    store_generation: int
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ..., perplexity: _Optional[float] = ..., perplexity_parametric: _Optional[float] = ..., mode: _Optional[str] = ..., store_generation: _Optional[int] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("ids", "tokens")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("name", "owner", "entries", "documents")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    owner: str
    entries: int
    documents: int
    def __init__(self, name: _Optional[str] = ..., owner: _Optional[str] = ..., entries: _Optional[int] = ..., documents: _Optional[int] = ...) -> None: ...

class StoreInfo(_message.Message):
    __slots__ = ("path", "generation", "fingerprint", "index", "entries", "shard_count", "shards")
    PATH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    generation: int
    fingerprint: str
    index: str
    entries: int
    shard_count: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    def __init__(self, path: _Optional[str] = ..., generation: _Optional[int] = ..., fingerprint: _Optional[str] = ..., index: _Optional[str] = ..., entries: _Optional[int] = ..., shard_count: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ...) -> None: ...

class KnnDefaults(_message.Message):
    __slots__ = ("k", "lmbda", "tau", "mixture", "skip_threshold")
    K_FIELD_NUMBER: _ClassVar[int]
    LMBDA_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    MIXTURE_FIELD_NUMBER: _ClassVar[int]
    SKIP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    k: int
    lmbda: float
    tau: float
    mixture: str
    skip_threshold: float
    def __init__(self, k: _Optional[int] = ..., lmbda: _Optional[float] = ..., tau: _Optional[float] = ..., mixture: _Optional[str] = ..., skip_threshold: _Optional[float] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "model_path", "fingerprint", "context_length", "vocab_size", "training_policy", "store", "knn", "modes", "max_tokens_default", "max_tokens_limit")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRAINING_POLICY_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    KNN_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_path: str
    fingerprint: str
    context_length: int
    vocab_size: int
    training_policy: str
    store: StoreInfo
    knn: KnnDefaults
    modes: _containers.RepeatedScalarFieldContainer[str]
    max_tokens_default: int
    max_tokens_limit: int
    def __init__(self, model_name: _Optional[str] = ..., model_path: _Optional[str] = ..., fingerprint: _Optional[str] = ..., context_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., training_policy: _Optional[str] = ..., store: _Optional[_Union[StoreInfo, _Mapping]] = ..., knn: _Optional[_Union[KnnDefaults, _Mapping]] = ..., modes: _Optional[_Iterable[str]] = ..., max_tokens_default: _Optional[int] = ..., max_tokens_limit: _Optional[int] = ...) -> None: ...

class ListShardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SwapDatastoreRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ReloadDatastoreRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DatastoreChange(_message.Message):
    __slots__ = ("changed", "previous", "current")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    previous: StoreInfo
    current: StoreInfo
    def __init__(self, changed: _Optional[bool] = ..., previous: _Optional[_Union[StoreInfo, _Mapping]] = ..., current: _Optional[_Union[StoreInfo, _Mapping]] = ...) -> None: ...

class RemovalRequest(_message.Message):
    __slots__ = ("owner", "document_ids", "shards", "requester", "reason", "request_id", "wait", "skip_verification")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    SKIP_VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    owner: str
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    shards: _containers.RepeatedScalarFieldContainer[str]
    requester: str
    reason: str
    request_id: str
    wait: bool
    skip_verification: bool
    def __init__(self, owner: _Optional[str] = ..., document_ids: _Optional[_Iterable[str]] = ..., shards: _Optional[_Iterable[str]] = ..., requester: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ..., wait: _Optional[bool] = ..., skip_verification: _Optional[bool] = ...) -> None: ...

class GetRemovalRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class RemovalStatus(_message.Message):
    __slots__ = ("request_id", "status", "kind", "owner", "document_ids", "shards", "requester", "created", "entries", "generation", "verification_passed", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_PASSED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status: str
    kind: str
    owner: str
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    shards: _containers.RepeatedScalarFieldContainer[str]
    requester: str
    created: str
    entries: int
    generation: int
    verification_passed: bool
    error: str
    def __init__(self, request_id: _Optional[str] = ..., status: _Optional[str] = ..., kind: _Optional[str] = ..., owner: _Optional[str] = ..., document_ids: _Optional[_Iterable[str]] = ..., shards: _Optional[_Iterable[str]] = ..., requester: _Optional[str] = ..., created: _Optional[str] = ..., entries: _Optional[int] = ..., generation: _Optional[int] = ..., verification_passed: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ListRemovalsRequest(_message.Message):
    __slots__ = ("owner",)
    OWNER_FIELD_NUMBER: _ClassVar[int]
    owner: str
    def __init__(self, owner: _Optional[str] = ...) -> None: ...

class ListRemovalsResponse(_message.Message):
    __slots__ = ("removals",)
    REMOVALS_FIELD_NUMBER: _ClassVar[int]
    removals: _containers.RepeatedCompositeFieldContainer[RemovalStatus]
    def __init__(self, removals: _Optional[_Iterable[_Union[RemovalStatus, _Mapping]]] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("request_id", "status", "json")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status: str
    json: str
    def __init__(self, request_id: _Optional[str] = ..., status: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("document_id", "text")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    text: str
    def __init__(self, document_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class LookupMatch(_message.Message):
    __slots__ = ("shard", "owner", "document_id", "title", "match", "entries", "live", "matched_sentences")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    shard: str
    owner: str
    document_id: str
    title: str
    match: str
    entries: int
    live: bool
    matched_sentences: int
    def __init__(self, shard: _Optional[str] = ..., owner: _Optional[str] = ..., document_id: _Optional[str] = ..., title: _Optional[str] = ..., match: _Optional[str] = ..., entries: _Optional[int] = ..., live: _Optional[bool] = ..., matched_sentences: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("in_store", "entries", "shards", "matches", "generation", "query_sentences", "matched_sentences", "matched_chars")
    IN_STORE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    QUERY_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    MATCHED_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    MATCHED_CHARS_FIELD_NUMBER: _ClassVar[int]
    in_store: bool
    entries: int
    shards: _containers.RepeatedScalarFieldContainer[str]
    matches: _containers.RepeatedCompositeFieldContainer[LookupMatch]
    generation: int
    query_sentences: int
    matched_sentences: int
    matched_chars: int
    def __init__(self, in_store: _Optional[bool] = ..., entries: _Optional[int] = ..., shards: _Optional[_Iterable[str]] = ..., matches: _Optional[_Iterable[_Union[LookupMatch, _Mapping]]] = ..., generation: _Optional[int] = ..., query_sentences: _Optional[int] = ..., matched_sentences: _Optional[int] = ..., matched_chars: _Optional[int] = ...) -> None: ...

class LedgerRequest(_message.Message):
    __slots__ = ("owner",)
    OWNER_FIELD_NUMBER: _ClassVar[int]
    owner: str
    def __init__(self, owner: _Optional[str] = ...) -> None: ...

class OwnerCredit(_message.Message):
    __slots__ = ("owner", "responses", "tokens", "share", "first_credit", "last_credit", "removed", "removed_at", "removal_request")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    FIRST_CREDIT_FIELD_NUMBER: _ClassVar[int]
    LAST_CREDIT_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_AT_FIELD_NUMBER: _ClassVar[int]
    REMOVAL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    owner: str
    responses: int
    tokens: float
    share: float
    first_credit: str
    last_credit: str
    removed: bool
    removed_at: str
    removal_request: str
    def __init__(self, owner: _Optional[str] = ..., responses: _Optional[int] = ..., tokens: _Optional[float] = ..., share: _Optional[float] = ..., first_credit: _Optional[str] = ..., last_credit: _Optional[str] = ..., removed: _Optional[bool] = ..., removed_at: _Optional[str] = ..., removal_request: _Optional[str] = ...) -> None: ...

class LedgerResponse(_message.Message):
    __slots__ = ("owners", "responses")
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    owners: _containers.RepeatedCompositeFieldContainer[OwnerCredit]
    responses: int
    def __init__(self, owners: _Optional[_Iterable[_Union[OwnerCredit, _Mapping]]] = ..., responses: _Optional[int] = ...) -> None: ...
