"""tiergate's Python client: `Client` (Route, Verify, Feedback, Info, health, and the
cascade helper) and the generated messages as `pb`."""
from ._pb import tiergate_pb2 as pb
from .client import Attempt, CascadeResult, Client, Message, Policy, Reply, VerifyMode
from .errors import TiergateError

__all__ = [
    "Attempt", "CascadeResult", "Client", "Message", "Policy", "Reply", "TiergateError",
    "VerifyMode", "pb",
]
