"""One writer at a time: flock on local disk, a lease object on S3."""
import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Optional

from lake.errors import EtlError, one_line
from lake.paths import join, split_s3

LOG = logging.getLogger("sparkify_etl")
LOCK_NAME = "_lock"  # local output: held with flock, which the kernel releases when the process dies
LEASE_NAME = "_lease.json"  # S3 output: created with a conditional PUT, renewed while the run lives
LEASE_TTL_S = 300
LEASE_RENEW_S = 60

try:
    from typing import Protocol
except ImportError:  # Python < 3.8
    Protocol = object  # type: ignore


class Lock(Protocol):
    def take(self, run_id: str) -> None:
        """Holds the lake for this run, or fails with one line naming the holder."""

    def release(self) -> None: ...


class FileLock:
    """flock on <root>/_lock: the kernel drops it when the process dies, however it dies."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._handle = None

    def take(self, run_id: str) -> None:
        import fcntl  # POSIX only, like the atomic swap

        handle = open(join(self.root, LOCK_NAME), "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise EtlError(f"another run is writing to {self.root} ({holder}); wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"run {run_id}, pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class S3Lease:
    """A lease object, created only if absent (a conditional PUT); a lease not renewed in time is stale."""

    def __init__(self, client, root: str) -> None:
        self.root = root
        self._client = client
        self._bucket, self._key = split_s3(join(root, LEASE_NAME))
        self._renewer: Optional[threading.Timer] = None

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self._client.get_object(Bucket=self._bucket, Key=self._key)["Body"].read())
        except self._client.exceptions.NoSuchKey:
            return None

    def take(self, run_id: str) -> None:
        lease = self._read()
        if lease and not _is_stale(lease):
            raise EtlError(f"another run is writing to {self.root} (run {lease.get('run_id')} on "
                           f"{lease.get('host')}, lease until {_utc(lease['expires_at'])}); wait, or see "
                           f"docs/operations.md to clear a stale lease")
        if lease:
            LOG.warning("taking over the stale lease of run %s (until %s, pid %s on %s)", lease.get("run_id"),
                        _utc(lease.get("expires_at", 0)), lease.get("pid"), lease.get("host"))
            self._client.delete_object(Bucket=self._bucket, Key=self._key)
        try:
            self._renew(run_id, IfNoneMatch="*")
        except self._client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise
            raise EtlError(f"another run took the lease of {self.root} just now; wait for it to finish") from None

    def _renew(self, run_id: str, **conditions: str) -> None:
        document = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                    "expires_at": time.time() + LEASE_TTL_S}
        body = json.dumps(document, indent=2).encode() + b"\n"
        if conditions:  # taking the lease: a failure is the caller's to report
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=body, **conditions)
        else:
            try:  # renewing, on a timer thread: a failure must not print a traceback; the run fails anyway
                self._client.put_object(Bucket=self._bucket, Key=self._key, Body=body)
            except Exception as exc:
                LOG.warning("could not renew the lease %s: %s", join(self.root, LEASE_NAME), one_line(exc))
        self._renewer = threading.Timer(LEASE_RENEW_S, self._renew, args=(run_id,))
        self._renewer.daemon = True  # a dead driver stops renewing, so its lease goes stale
        self._renewer.start()

    def release(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        self._client.delete_object(Bucket=self._bucket, Key=self._key)


def _is_stale(lease: dict) -> bool:
    """Not renewed in time, or its run was on this machine and its process is gone (killed, say)."""
    if lease.get("expires_at", 0) < time.time():
        return True
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease.get("pid", 0)), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        pass
    return False


def _utc(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="seconds")
