"""Secrets never travel in a URI: refused where a URI comes in, redacted wherever a command line is recorded.

A URI is printed, logged to MLflow as a param or tag, written to the sweep's log and put on a Ray job's command
line (which ``ray job list`` and the dashboard show to everyone who can reach the cluster). So a URI carrying a
key (``s3://KEY:SECRET@bucket/x``, ``http://user:password@mlflow:5000``, ``?secret_key=...``) is refused
with a pointer to where the secret belongs (the environment, an instance role, a credentials file), and
every recorded command line and error message goes through ``redact`` in case one slipped past.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

# Query keys that carry a secret: pyarrow's S3 URIs take access_key/secret_key/session_token, signed URLs
# carry a signature, some stores a token or password.
_SECRET_QUERY_KEYS = re.compile(r"(?i)^(access_key|secret_key|session_token|token|password|passwd|sig|signature)$")
# Object-store and file-system schemes whose URI user part is an access key (pyarrow reads it as one).
_KEY_IN_USER = ("s3", "gs", "gcs", "abfs", "abfss")

WHERE_SECRETS_GO = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials or an instance role",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or the node's service account",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS or the node's service account",
    "http": "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN",
    "https": "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN",
}

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s?#]+)@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<key>[?&](?:access_key|secret_key|session_token|token|password|passwd|sig|signature)=)[^&\s#'\"]+"
)
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?P<key>\b[A-Z0-9_]*(?:SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY)[A-Z0-9_]*=)[^\s'\"&]+"
)


def credential_problem(uri: str) -> str | None:
    """Why ``uri`` may not be used (None when it may): it carries a key, password or token."""
    if "://" not in uri:
        return None
    try:
        parts = urlsplit(uri)
        query = parse_qsl(parts.query, keep_blank_values=True)
        password, username = parts.password, parts.username
    except ValueError:
        return None  # not a URI this module can read; whoever opens it says why
    scheme = parts.scheme.lower()
    secret_keys = [key for key, _ in query if _SECRET_QUERY_KEYS.match(key)]
    if not (password or (username and scheme in _KEY_IN_USER) or secret_keys):
        return None
    what = f"the query key(s) {', '.join(secret_keys)}" if secret_keys else "a user and password"
    where = WHERE_SECRETS_GO.get(scheme, "the environment of the processes that open it")
    return (
        f"carries credentials ({what}); URIs are printed, logged and shown on the cluster, so secrets are refused "
        f"in them: set them in {where} instead"
    )


def redact(text: str) -> str:
    """``text`` with the secrets a URI or an assignment may carry replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    text = _SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)
    return _SECRET_ASSIGNMENT.sub(lambda m: f"{m['key']}***", text)


def redacted_command() -> str:
    """This process's command line as recorded (MLflow's ``command`` tag, the sweep's log), redacted."""
    return redact(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
