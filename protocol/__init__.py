"""What travels between eventspec's processes: typed msgpack messages and the sockets that carry them."""
from .messages import (MESSAGE_TYPES, PROTOCOL_VERSION, Decode, DecodeResult, Done, Draft, Error, Heartbeat, Hello,
                       Message, Prefill, PrefillDone, ProtocolError, Ready, Rebase, Shutdown, Stop, Verify,
                       VerifyResult, decode, encode)

__all__ = [
    "MESSAGE_TYPES", "PROTOCOL_VERSION", "Decode", "DecodeResult", "Done", "Draft", "Error", "Heartbeat", "Hello",
    "Message", "Prefill", "PrefillDone", "ProtocolError", "Ready", "Rebase", "Shutdown", "Stop", "Verify",
    "VerifyResult", "decode", "encode",
]
