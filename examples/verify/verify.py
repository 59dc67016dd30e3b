"""Verify flashgate's X-Flashgate-Signature in a Python backend.

    from verify import verify_admission
    ok, reason = verify_admission(request.headers, request.method, request.full_path,
                                  keys={"k1": os.environb[b"FLASHGATE_SIGNING_KEY"]})

`path_and_query` is the request target exactly as your server received it (path plus `?query`
when there is one). Refuse the order when `ok` is False. Tested against flashgate's real output
by tests/signing.rs; run as a script it reads one JSON case on stdin (see `main`).
"""
import hashlib
import hmac
import json
import sys
import time

MAX_AGE = 60  # seconds; flashgate signs as it forwards


def verify_admission(headers, method, path_and_query, keys, max_age=MAX_AGE, now=None):
    """Return (True, "ok") when the signature holds, else (False, reason)."""
    get = lambda name: headers.get(name) if hasattr(headers, "get") else None
    header = get("X-Flashgate-Signature") or get("x-flashgate-signature")
    if not header:
        return False, "no signature"
    fields = {}
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name in fields or name not in ("t", "kid", "v1"):
            return False, "malformed signature"
        fields[name] = value
    if set(fields) != {"t", "kid", "v1"} or not fields["t"].isdigit():
        return False, "malformed signature"
    key = keys.get(fields["kid"])
    if key is None:
        return False, "unknown key id"
    now = int(time.time()) if now is None else now
    if abs(now - int(fields["t"])) > max_age:
        return False, "signature too old"
    value = lambda name: get(name) or get(name.lower()) or ""
    signed = "\n".join([
        fields["t"], fields["kid"], method, path_and_query,
        value("X-Flashgate-Reservation"), value("X-Flashgate-Sku"),
        value("X-Flashgate-User"), value("X-Flashgate-Quantity"),
    ])
    if isinstance(key, str):
        key = key.encode()
    expected = hmac.new(key, signed.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, fields["v1"]):
        return False, "signature does not match"
    return True, "ok"


def main():
    """{"headers": {...}, "method": "POST", "path": "/...", "keys": {"k1": "..."}, "now": 123}"""
    case = json.load(sys.stdin)
    ok, reason = verify_admission(case["headers"], case["method"], case["path"],
                                  case["keys"], now=case.get("now"))
    print(reason)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
