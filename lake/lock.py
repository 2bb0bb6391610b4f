"""One writer at a time: flock on local disk, a lease object on S3."""
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Optional, Protocol, Tuple

from lake.errors import EtlError, one_line
from lake.paths import join, split_s3

LOG = logging.getLogger(__name__)
LOCK_NAME = "_lock"  # local output: held with flock, which the kernel releases when the process dies
LEASE_NAME = "_lease.json"  # S3 output: written only by compare-and-swap, renewed while the run lives
LEASE_TTL_S = 300
LEASE_RENEW_S = 60
# A check between steps goes on only with this much of the lease left, should S3 refuse to renew it for a
# while: the step that follows must end before anyone may take the lease over.
LEASE_MARGIN_S = 60
# What tells a dead holder on this machine from a live one: the kernel's boot and the pid namespace the pid
# belongs to (containers on one host share the host name, and often the boot, but not the pid namespace).
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
PID_NAMESPACE_PATH = "/proc/self/ns/pid"
# S3's answers to a condition that does not hold: 412, or 404 for If-Match on a key that is gone.
CONDITION_FAILED = ("PreconditionFailed", "NoSuchKey", "404", "412")



class LeaseLost(EtlError):
    """Another run holds the lake now: this run must write nothing more to it."""


class Lock(Protocol):
    def take(self, run_id: str) -> None:
        """Holds the lake for this run, or fails with one line naming the holder."""

    def check(self) -> None:
        """Raises LeaseLost unless this run still holds the lake (called before each step of the publish)."""

    def still_held(self) -> None:
        """As check, from what this run knows already, without a request: called before each PUT."""

    def may_still_write(self, run_id: str) -> bool:
        """Whether run_id, a run whose staging this run found, may still be sending writes to the lake (it
        lost the lake while it lived, rather than died): its publish must then be fenced (lake.publish)."""

    @property
    def lost(self) -> Optional[str]:
        """Why this run no longer holds the lake, or None."""

    def release(self) -> None: ...


class FileLock:
    """flock on <root>/_lock: the kernel drops it when the process dies, however it dies, and never before."""

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

    def check(self) -> None:
        pass  # a flock is held until this process ends

    def still_held(self) -> None:
        pass

    def may_still_write(self, run_id: str) -> bool:
        return False  # the kernel releases a flock only when its process is gone

    @property
    def lost(self) -> Optional[str]:
        return None

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class S3Lease:
    """<root>/_lease.json, changed only by compare-and-swap on its ETag.

    - Taking: created with If-None-Match: * when absent; a stale lease is replaced with If-Match on the
      ETag read, so of two runs that read the same stale lease only one replaces it.
    - Renewing (every LEASE_RENEW_S, and at each check): If-Match on the ETag of this run's own last write.
      A refusal means another run has taken the lease over: the lease is lost, for good.
    - Releasing: DELETE with If-Match on this run's ETag, so a successor's lease is never deleted.
    A stale lease: its expiry has passed, or its holder ran on this machine (same host, boot and pid
    namespace) and its process is gone.
    """

    def __init__(self, client, root: str, ttl_s: float = LEASE_TTL_S, renew_s: float = LEASE_RENEW_S) -> None:
        self.root = root
        self._client = client
        self._bucket, self._key = split_s3(join(root, LEASE_NAME))
        self._ttl_s, self._renew_s = ttl_s, renew_s
        # Names this holder apart from every other, whatever its host and pid: a write whose answer was lost
        # (and whose retry then failed its condition) is recognised as this run's own.
        self._token = uuid.uuid4().hex
        self._run_id: Optional[str] = None
        self._etag: Optional[str] = None  # of this run's last write of the lease
        self._valid_until = 0.0  # this machine's clock: no one may take the lease over before
        self._lost: Optional[str] = None
        self._replaced: Optional[dict] = None  # the stale lease this run took over
        self._mutex = threading.Lock()  # the renewal thread and the run's checks
        self._stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    @property
    def lost(self) -> Optional[str]:
        return self._lost

    def inspect(self) -> Tuple[Optional[dict], Optional[str]]:
        """The lease as it is now, and its ETag: (None, None) if there is none."""
        try:
            answer = self._client.get_object(Bucket=self._bucket, Key=self._key)
        except self._client.exceptions.NoSuchKey:
            return None, None
        try:
            document = json.loads(answer["Body"].read())
        except ValueError:
            document = {}  # not ours to read: stale unless renewed, which a reader of it cannot be
        return document, answer["ETag"]

    def take(self, run_id: str) -> None:
        self.claim(run_id, self.inspect())

    def claim(self, run_id: str, seen: Tuple[Optional[dict], Optional[str]]) -> None:
        """Takes the lease as seen (by inspect) a moment ago: absent, or stale; fails with one line otherwise,
        or if another run changed it since."""
        lease, etag = seen
        if lease is not None and not is_stale(lease):
            raise EtlError(f"another run is writing to {self.root} ({_holder(lease)}, lease until "
                           f"{_utc(lease.get('expires_at', 0))}); wait, or see docs/operations.md to clear a "
                           f"stale lease")
        if lease is not None:
            LOG.warning("taking over the stale lease of %s (until %s)", _holder(lease),
                        _utc(lease.get("expires_at", 0)))
        self._replaced = lease
        self._run_id = run_id
        condition = {"IfMatch": etag} if lease is not None else {"IfNoneMatch": "*"}
        held, now = self._write(condition)
        if not held:
            who = _holder(now) if now else "a run that has since finished"
            raise EtlError(f"another run took the lease of {self.root} just now ({who}); wait for it to finish")
        self._renewer = threading.Thread(target=self._keep_renewing, name="lease-renewal", daemon=True)
        self._renewer.start()  # a daemon: a dead driver stops renewing, so its lease goes stale

    def _write(self, condition: dict) -> Tuple[bool, Optional[dict]]:
        """One conditional PUT of this run's lease: (True, None), or (False, the lease as it is now) if the
        condition failed, the lease being someone else's."""
        sent = time.time()
        document = {"run_id": self._run_id, "host": socket.gethostname(), "pid": os.getpid(),
                    "boot_id": _boot_id(), "pid_namespace": _pid_namespace(), "token": self._token,
                    "expires_at": sent + self._ttl_s}
        body = json.dumps(document, indent=2).encode() + b"\n"
        try:
            answer = self._client.put_object(Bucket=self._bucket, Key=self._key, Body=body,
                                             ContentType="application/json", **condition)
            self._etag = answer["ETag"]
        except self._client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in CONDITION_FAILED:
                raise
            # Refused: someone else's lease now, unless this very write landed and only its answer was lost
            # (the retry then met this run's own ETag).
            now, etag = self.inspect()
            if not now or now.get("token") != self._token:
                return False, now
            self._etag = etag
        self._valid_until = sent + self._ttl_s
        return True, None

    def renew(self) -> None:
        """Extends the lease, if this run still holds it; marks it lost if another run has taken it over. A
        failure to reach S3 leaves it held (until its expiry: see check)."""
        with self._mutex:
            if self._lost:
                return
            try:
                held, now = self._write({"IfMatch": self._etag})
            except Exception as exc:  # S3 failing: the lease may still be ours, and check() counts the time
                LOG.warning("could not renew the lease %s: %s", join(self.root, LEASE_NAME), one_line(exc))
                return
            if held:
                return
            who = _holder(now) if now else "nobody: the lease was deleted"
            self._lost = f"this run lost its lease on {self.root}, which is now held by {who}"
            LOG.error("%s", self._lost)

    def _keep_renewing(self) -> None:
        while not self._stop.wait(self._renew_s):
            self.renew()
            if self._lost:
                return

    def check(self) -> None:
        """Renews the lease now, so the step that follows has its whole TTL; raises LeaseLost if this run no
        longer holds it, or can no longer be sure it will for LEASE_MARGIN_S."""
        self.renew()
        self.still_held()

    def still_held(self) -> None:
        """Raises LeaseLost if this run knows it lost the lease, or has less than LEASE_MARGIN_S of it left
        by its own clock: no request is sent once a successor may have taken over."""
        if self._lost:
            raise LeaseLost(self._lost)
        if time.time() > self._valid_until - min(LEASE_MARGIN_S, self._ttl_s / 2):
            self._lost = f"this run could not renew its lease on {self.root} in time"
            raise LeaseLost(self._lost)

    def may_still_write(self, run_id: str) -> bool:
        """Only the holder of the lease this run took over is known to be gone, and only if it ran on this
        machine and its process has ended; any other run may have been stalled past its lease, not dead."""
        replaced = self._replaced or {}
        return replaced.get("run_id") != run_id or not _process_gone(replaced)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._mutex:
            if self._lost or self._etag is None:
                return  # not ours: leave it to its holder
            try:
                self._client.delete_object(Bucket=self._bucket, Key=self._key, IfMatch=self._etag)
            except self._client.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in CONDITION_FAILED:
                    raise
                LOG.warning("the lease on %s is no longer this run's; left to its holder", self.root)
            self._etag = None


def is_stale(lease: dict) -> bool:
    """Not renewed in time, or its holder ran on this machine, in this pid namespace, and is gone."""
    return lease.get("expires_at", 0) < time.time() or _process_gone(lease)


def _process_gone(lease: dict) -> bool:
    """Whether the lease's holder ran on this machine, in this pid namespace, and its process has ended."""
    here = (socket.gethostname(), _boot_id(), _pid_namespace())
    if None in here[1:] or (lease.get("host"), lease.get("boot_id"), lease.get("pid_namespace")) != here:
        return False  # another machine, boot or container: only its expiry can tell
    try:
        os.kill(int(lease.get("pid", 0)), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        pass
    return False


def _boot_id() -> Optional[str]:
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:  # not Linux
        return None


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink(PID_NAMESPACE_PATH)  # "pid:[4026531836]"
    except OSError:
        return None


def _holder(lease: dict) -> str:
    return f"run {lease.get('run_id')} on {lease.get('host')}"


def _utc(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="seconds")
