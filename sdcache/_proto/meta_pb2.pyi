from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Manifest(_message.Message):
    __slots__ = ("path", "size", "mtime", "source", "version_tag", "sha256", "chunks", "kind", "base", "metadata", "generation", "replicas")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MTIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VERSION_TAG_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    mtime: float
    source: str
    version_tag: str
    sha256: str
    chunks: bytes
    kind: str
    base: str
    metadata: _containers.ScalarMap[str, str]
    generation: int
    replicas: int
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., mtime: _Optional[float] = ..., source: _Optional[str] = ..., version_tag: _Optional[str] = ..., sha256: _Optional[str] = ..., chunks: _Optional[bytes] = ..., kind: _Optional[str] = ..., base: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., generation: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("path", "is_dir", "size", "mtime", "kind", "sha256", "generation", "chunk_count")
    PATH_FIELD_NUMBER: _ClassVar[int]
    IS_DIR_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MTIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    path: str
    is_dir: bool
    size: int
    mtime: float
    kind: str
    sha256: str
    generation: int
    chunk_count: int
    def __init__(self, path: _Optional[str] = ..., is_dir: _Optional[bool] = ..., size: _Optional[int] = ..., mtime: _Optional[float] = ..., kind: _Optional[str] = ..., sha256: _Optional[str] = ..., generation: _Optional[int] = ..., chunk_count: _Optional[int] = ...) -> None: ...

class PathRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("path", "page_token", "page_size")
    PATH_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    page_token: str
    page_size: int
    def __init__(self, path: _Optional[str] = ..., page_token: _Optional[str] = ..., page_size: _Optional[int] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("manifest",)
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("path", "recursive")
    PATH_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    path: str
    recursive: bool
    def __init__(self, path: _Optional[str] = ..., recursive: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("node_id", "address", "capacity", "role", "host_id", "pool_dir", "used", "chunks", "last_seen", "alive", "zone")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_DIR_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    capacity: int
    role: str
    host_id: str
    pool_dir: str
    used: int
    chunks: int
    last_seen: float
    alive: bool
    zone: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., capacity: _Optional[int] = ..., role: _Optional[str] = ..., host_id: _Optional[str] = ..., pool_dir: _Optional[str] = ..., used: _Optional[int] = ..., chunks: _Optional[int] = ..., last_seen: _Optional[float] = ..., alive: _Optional[bool] = ..., zone: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval", "pins_generation", "auth_generation", "store_url")
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    PINS_GENERATION_FIELD_NUMBER: _ClassVar[int]
    AUTH_GENERATION_FIELD_NUMBER: _ClassVar[int]
    STORE_URL_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval: float
    pins_generation: int
    auth_generation: int
    store_url: str
    def __init__(self, heartbeat_interval: _Optional[float] = ..., pins_generation: _Optional[int] = ..., auth_generation: _Optional[int] = ..., store_url: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "used", "chunks")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    used: int
    chunks: int
    def __init__(self, node_id: _Optional[str] = ..., used: _Optional[int] = ..., chunks: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "pins_generation", "auth_generation")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    PINS_GENERATION_FIELD_NUMBER: _ClassVar[int]
    AUTH_GENERATION_FIELD_NUMBER: _ClassVar[int]
    known: bool
    pins_generation: int
    auth_generation: int
    def __init__(self, known: _Optional[bool] = ..., pins_generation: _Optional[int] = ..., auth_generation: _Optional[int] = ...) -> None: ...

class NodesRequest(_message.Message):
    __slots__ = ("include_dead",)
    INCLUDE_DEAD_FIELD_NUMBER: _ClassVar[int]
    include_dead: bool
    def __init__(self, include_dead: _Optional[bool] = ...) -> None: ...

class NodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("path", "recursive")
    PATH_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    path: str
    recursive: bool
    def __init__(self, path: _Optional[str] = ..., recursive: _Optional[bool] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: int
    def __init__(self, files: _Optional[int] = ...) -> None: ...

class PinnedChunksRequest(_message.Message):
    __slots__ = ("page_token", "page_size")
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    page_token: str
    page_size: int
    def __init__(self, page_token: _Optional[str] = ..., page_size: _Optional[int] = ...) -> None: ...

class PinnedChunksResponse(_message.Message):
    __slots__ = ("generation", "ids", "next_page_token")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    generation: int
    ids: bytes
    next_page_token: str
    def __init__(self, generation: _Optional[int] = ..., ids: _Optional[bytes] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WarmupRequest(_message.Message):
    __slots__ = ("paths", "recursive", "check")
    PATHS_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedScalarFieldContainer[str]
    recursive: bool
    check: bool
    def __init__(self, paths: _Optional[_Iterable[str]] = ..., recursive: _Optional[bool] = ..., check: _Optional[bool] = ...) -> None: ...

class WarmupProgress(_message.Message):
    __slots__ = ("path", "total_bytes", "done_bytes", "pool_capacity", "fits_bytes", "message", "done")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DONE_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    FITS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    path: str
    total_bytes: int
    done_bytes: int
    pool_capacity: int
    fits_bytes: int
    message: str
    done: bool
    def __init__(self, path: _Optional[str] = ..., total_bytes: _Optional[int] = ..., done_bytes: _Optional[int] = ..., pool_capacity: _Optional[int] = ..., fits_bytes: _Optional[int] = ..., message: _Optional[str] = ..., done: _Optional[bool] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("paths", "recursive")
    PATHS_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedScalarFieldContainer[str]
    recursive: bool
    def __init__(self, paths: _Optional[_Iterable[str]] = ..., recursive: _Optional[bool] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("chunks", "bytes")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    bytes: int
    def __init__(self, chunks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("files", "bytes", "unique_chunks", "unique_bytes", "nodes", "capacity", "used", "pinned_files", "store_url", "replicated_bytes", "replicas", "zones")
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FILES_FIELD_NUMBER: _ClassVar[int]
    STORE_URL_FIELD_NUMBER: _ClassVar[int]
    REPLICATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ZONES_FIELD_NUMBER: _ClassVar[int]
    files: int
    bytes: int
    unique_chunks: int
    unique_bytes: int
    nodes: int
    capacity: int
    used: int
    pinned_files: int
    store_url: str
    replicated_bytes: int
    replicas: int
    zones: int
    def __init__(self, files: _Optional[int] = ..., bytes: _Optional[int] = ..., unique_chunks: _Optional[int] = ..., unique_bytes: _Optional[int] = ..., nodes: _Optional[int] = ..., capacity: _Optional[int] = ..., used: _Optional[int] = ..., pinned_files: _Optional[int] = ..., store_url: _Optional[str] = ..., replicated_bytes: _Optional[int] = ..., replicas: _Optional[int] = ..., zones: _Optional[int] = ...) -> None: ...

class ReplicaRule(_message.Message):
    __slots__ = ("path", "replicas")
    PATH_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    path: str
    replicas: int
    def __init__(self, path: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class ReplicasRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ReplicasResponse(_message.Message):
    __slots__ = ("default_replicas", "overrides", "path", "replicas", "live_nodes", "live_zones", "warning")
    DEFAULT_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LIVE_NODES_FIELD_NUMBER: _ClassVar[int]
    LIVE_ZONES_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    default_replicas: int
    overrides: _containers.RepeatedCompositeFieldContainer[ReplicaRule]
    path: str
    replicas: int
    live_nodes: int
    live_zones: int
    warning: str
    def __init__(self, default_replicas: _Optional[int] = ..., overrides: _Optional[_Iterable[_Union[ReplicaRule, _Mapping]]] = ..., path: _Optional[str] = ..., replicas: _Optional[int] = ..., live_nodes: _Optional[int] = ..., live_zones: _Optional[int] = ..., warning: _Optional[str] = ...) -> None: ...

class ConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConfigResponse(_message.Message):
    __slots__ = ("store_url",)
    STORE_URL_FIELD_NUMBER: _ClassVar[int]
    store_url: str
    def __init__(self, store_url: _Optional[str] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("name", "role", "created", "expires", "revoked")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    created: float
    expires: float
    revoked: float
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., created: _Optional[float] = ..., expires: _Optional[float] = ..., revoked: _Optional[float] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("name", "role", "ttl_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    ttl_seconds: float
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "info")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    token: str
    info: TokenInfo
    def __init__(self, token: _Optional[str] = ..., info: _Optional[_Union[TokenInfo, _Mapping]] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AuthStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuthStateResponse(_message.Message):
    __slots__ = ("enabled", "public_keys", "revoked", "generation")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    public_keys: _containers.RepeatedScalarFieldContainer[bytes]
    revoked: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    generation: int
    def __init__(self, enabled: _Optional[bool] = ..., public_keys: _Optional[_Iterable[bytes]] = ..., revoked: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ..., generation: _Optional[int] = ...) -> None: ...

class RunnerReport(_message.Message):
    __slots__ = ("runner_id", "address", "state", "ttl")
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    runner_id: str
    address: str
    state: bytes
    ttl: float
    def __init__(self, runner_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[bytes] = ..., ttl: _Optional[float] = ...) -> None: ...

class RunnerReportResponse(_message.Message):
    __slots__ = ("report_interval", "auth_generation")
    REPORT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    AUTH_GENERATION_FIELD_NUMBER: _ClassVar[int]
    report_interval: float
    auth_generation: int
    def __init__(self, report_interval: _Optional[float] = ..., auth_generation: _Optional[int] = ...) -> None: ...

class RunnersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunnerInfo(_message.Message):
    __slots__ = ("runner_id", "address", "state", "age")
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    runner_id: str
    address: str
    state: bytes
    age: float
    def __init__(self, runner_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[bytes] = ..., age: _Optional[float] = ...) -> None: ...

class RunnersResponse(_message.Message):
    __slots__ = ("runners",)
    RUNNERS_FIELD_NUMBER: _ClassVar[int]
    runners: _containers.RepeatedCompositeFieldContainer[RunnerInfo]
    def __init__(self, runners: _Optional[_Iterable[_Union[RunnerInfo, _Mapping]]] = ...) -> None: ...
