"""pytest plugin that `scripts/peft_compat.py` loads on BOTH sides when offline: Hub requests fail at once.

Offline, PEFT's tests fail wherever they need a Hub model, on both sides alike. But PEFT's `hub_online_once` turns
offline mode off for the first use of each model id, and huggingface_hub then retries every unreachable request with
back-off (1 + 2 + 4 + 8 + 8 s): about 45 s per test, hours over the suite. Without retries such a test fails at once;
which tests pass is unchanged.
"""

from huggingface_hub.utils import _http

_stock_backoff = _http._http_backoff_base


def _without_retries(*args, **kwargs):
    kwargs["max_retries"] = 0
    return _stock_backoff(*args, **kwargs)


_http._http_backoff_base = _without_retries  # http_backoff / http_stream_backoff look it up at call time
