"""silo.v1 messages as plain JSON values for the HTTP door (the same fields and names as on gRPC)."""

from __future__ import annotations


def as_dict(msg) -> dict:
    """Every field of `msg` by its proto name, integers as JSON numbers (protobuf's own JSON mapping writes
    64-bit integers as strings), floats rounded to 6 significant digits (most are float32 on the wire);
    an unset optional field is left out."""
    out = {}
    for f in msg.DESCRIPTOR.fields:
        repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED
        value = getattr(msg, f.name)
        if f.message_type is not None:
            if repeated:
                out[f.name] = [as_dict(x) for x in value]
            elif msg.HasField(f.name):
                out[f.name] = as_dict(value)
            continue
        if not repeated and f.has_presence and not msg.HasField(f.name):
            continue
        out[f.name] = [_plain(x) for x in value] if repeated else _plain(value)
    return out


def _plain(x):
    return float(f"{x:.6g}") if isinstance(x, float) else x
