"""What pyarrow's GcsFileSystem lacks, through google-cloud-storage: create-only writes
(if_generation_match=0, so a checkpoint's commit marker can never be replaced) and the
server-side MD5 of every object (so a checkpoint is verified without downloading it).

Also the one reader of STORAGE_EMULATOR_HOST, the standard variable that points both
google-cloud-storage and (storage/location.py) pyarrow at a GCS API server such as
storage/emulator.py instead of Google's.
"""

from __future__ import annotations

import os
from functools import lru_cache

EMULATOR_HOST = "STORAGE_EMULATOR_HOST"


def emulator_host() -> str | None:
    """The GCS API server to talk to instead of Google's (host:port or a URL), or None."""
    return os.environ.get(EMULATOR_HOST) or None


@lru_cache(maxsize=1)
def client():
    from google.cloud import storage

    if emulator_host():
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    return storage.Client()


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _identity(blob) -> dict:
    """What names one version of an object: its generation (a new one for every write) and the
    server's MD5 of its bytes."""
    return {"generation": int(blob.generation), "md5": blob.md5_hash}


def write_create_only(path: str, data: bytes) -> int:
    """Write bucket/key only if no object is there; its generation. FileExistsError otherwise."""
    from google.api_core.exceptions import PreconditionFailed

    bucket, key = _split(path)
    blob = client().bucket(bucket).blob(key)
    try:
        blob.upload_from_string(data, if_generation_match=0)
    except PreconditionFailed:
        raise FileExistsError(f"gs://{path} already exists") from None
    return int(blob.generation)


def replace_generation(path: str, data: bytes, generation: int) -> int:
    """Replace bucket/key only if it is still the generation seen; the new generation.
    FileExistsError if it changed or went (another writer moved first)."""
    from google.api_core.exceptions import NotFound, PreconditionFailed

    bucket, key = _split(path)
    blob = client().bucket(bucket).blob(key)
    try:
        blob.upload_from_string(data, if_generation_match=generation)
    except (PreconditionFailed, NotFound):
        raise FileExistsError(f"gs://{path} changed since generation {generation}") from None
    return int(blob.generation)


def read(path: str) -> tuple[bytes, int] | None:
    """bucket/key's bytes and their generation (one version, read whole), or None."""
    from google.api_core.exceptions import NotFound, PreconditionFailed

    bucket, key = _split(path)
    for _ in range(5):
        blob = client().bucket(bucket).get_blob(key)
        if blob is None:
            return None
        try:
            return blob.download_as_bytes(if_generation_match=blob.generation), int(blob.generation)
        except (NotFound, PreconditionFailed):
            continue  # replaced while read: read the new one
    raise OSError(f"gs://{path} kept changing while being read")


def upload_create_only(path: str, local_file: str) -> dict:
    """Upload local_file to bucket/key only if no object is there, or one with the same MD5 (a
    retried upload whose first try landed); FileExistsError otherwise. Returns the identity of
    the object that holds these bytes ({generation, md5}), what the commit checks."""
    from google.api_core.exceptions import PreconditionFailed

    bucket, key = _split(path)
    blob = client().bucket(bucket).blob(key)
    try:
        blob.upload_from_filename(local_file, if_generation_match=0)
        return _identity(blob)
    except PreconditionFailed:
        there = client().bucket(bucket).get_blob(key)
        if there is None or there.md5_hash != md5_file(local_file):
            raise FileExistsError(f"gs://{path} already exists") from None
        return _identity(there)


def stat(path: str) -> dict | None:
    """The identity ({generation, md5}) of the object at bucket/key now, or None."""
    bucket, key = _split(path)
    blob = client().bucket(bucket).get_blob(key)
    return None if blob is None else _identity(blob)


def delete_generation(path: str, generation: int) -> bool:
    """Delete bucket/key only if it is still the generation seen (a newer write is kept);
    whether it was deleted. Never a delete of whatever happens to be there now."""
    from google.api_core.exceptions import NotFound, PreconditionFailed

    bucket, key = _split(path)
    try:
        client().bucket(bucket).blob(key).delete(if_generation_match=generation)
        return True
    except (NotFound, PreconditionFailed):
        return False


def identities(prefix_path: str) -> dict[str, dict]:
    """{path relative to prefix: {generation, md5}} for every object under bucket/prefix/: one
    listing, no download."""
    bucket, prefix = _split(prefix_path.rstrip("/") + "/")
    return {blob.name[len(prefix):]: _identity(blob) for blob in client().list_blobs(bucket, prefix=prefix)}


def md5_file(local_file: str) -> str:
    """The base64 MD5 GCS reports for an object with local_file's bytes."""
    import base64
    import hashlib

    md5 = hashlib.md5(usedforsecurity=False)
    with open(local_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    return base64.b64encode(md5.digest()).decode()


def md5s(prefix_path: str) -> dict[str, str]:
    """{path relative to prefix: base64 MD5} for every object under bucket/prefix/."""
    bucket, prefix = _split(prefix_path.rstrip("/") + "/")
    out = {}
    for blob in client().list_blobs(bucket, prefix=prefix):
        out[blob.name[len(prefix):]] = blob.md5_hash
    return out
