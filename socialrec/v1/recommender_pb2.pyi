from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Recommendation(_message.Message):
    __slots__ = ("id", "score", "reason", "mutual_friends")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_FRIENDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    reason: str
    mutual_friends: int
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., reason: _Optional[str] = ..., mutual_friends: _Optional[int] = ...) -> None: ...

class RecommendContentRequest(_message.Message):
    __slots__ = ("user_id", "k", "exclude_ids")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_IDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    exclude_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RecommendContentResponse(_message.Message):
    __slots__ = ("items", "bundle_version", "cold_start", "degraded")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Recommendation]
    bundle_version: str
    cold_start: bool
    degraded: bool
    def __init__(self, items: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ..., bundle_version: _Optional[str] = ..., cold_start: _Optional[bool] = ..., degraded: _Optional[bool] = ...) -> None: ...

class RecommendFriendsRequest(_message.Message):
    __slots__ = ("user_id", "k", "exclude_ids")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_IDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    exclude_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RecommendFriendsResponse(_message.Message):
    __slots__ = ("users", "bundle_version", "cold_start", "degraded")
    USERS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[Recommendation]
    bundle_version: str
    cold_start: bool
    degraded: bool
    def __init__(self, users: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ..., bundle_version: _Optional[str] = ..., cold_start: _Optional[bool] = ..., degraded: _Optional[bool] = ...) -> None: ...

class LogInteractionRequest(_message.Message):
    __slots__ = ("user_id", "item_id", "weight", "timestamp_ms", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    weight: float
    timestamp_ms: int
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., weight: _Optional[float] = ..., timestamp_ms: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class LogInteractionResponse(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    def __init__(self, event_id: _Optional[str] = ...) -> None: ...

class FriendshipRequest(_message.Message):
    __slots__ = ("user_id", "friend_id", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FRIEND_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    friend_id: str
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., friend_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class FriendshipResponse(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    def __init__(self, event_id: _Optional[str] = ...) -> None: ...

class DismissRequest(_message.Message):
    __slots__ = ("user_id", "item_id", "other_user_id", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    OTHER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    other_user_id: str
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., other_user_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DismissResponse(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    def __init__(self, event_id: _Optional[str] = ...) -> None: ...

class BlockRequest(_message.Message):
    __slots__ = ("user_id", "blocked_id", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    blocked_id: str
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., blocked_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class BlockResponse(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    def __init__(self, event_id: _Optional[str] = ...) -> None: ...

class ItemRequest(_message.Message):
    __slots__ = ("item_id", "request_id")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    request_id: str
    def __init__(self, item_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ItemResponse(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    def __init__(self, event_id: _Optional[str] = ...) -> None: ...
