"""AWS credentials and the boto3 clients built from them: one place decides how a client is made."""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from lake.errors import EtlError

# Five attempts with the SDK's standard backoff (at most 2+4+8+16 s) survive resets and 503 SlowDown, and let
# a run whose endpoint is gone fail within a few minutes (docs/s3.md, "Faults and retries").
S3_ATTEMPTS = 5
# Glue: throttling and brief outages are retried with backoff; an endpoint that is down fails in about 10 s.
GLUE_ATTEMPTS = 4


@dataclass(frozen=True)
class AwsSettings:
    # Secrets: repr=False keeps them out of any log line or traceback.
    access_key: Optional[str] = field(default=None, repr=False)
    secret_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)
    region: Optional[str] = None
    endpoint: Optional[str] = None
    source: str = "default chain"  # where the keys came from, safe to log


def s3_client_settings(aws: AwsSettings, attempts: int = 2, pool: int = 10) -> Dict[str, Any]:
    """What an S3 client is made from, as plain data: Spark tasks make theirs from it (etl.fetch_s3_files),
    where a pickled botocore object could meet another botocore version.

    The default is few, short retries: a wrong bucket or endpoint fails the preflight in seconds."""
    return {"region_name": aws.region, "endpoint_url": aws.endpoint,
            "aws_access_key_id": aws.access_key, "aws_secret_access_key": aws.secret_key,
            "aws_session_token": aws.session_token,
            "config": {"connect_timeout": 5, "read_timeout": 20,
                       "retries": {"max_attempts": attempts, "mode": "standard"}, "max_pool_connections": pool,
                       "s3": {"addressing_style": "path"} if aws.endpoint else None}}


def s3_client(aws: AwsSettings, attempts: int = 2, pool: int = 10):
    try:
        import boto3  # only S3 runs need it, and EMR nodes have it
        from botocore.config import Config
    except ImportError:
        raise EtlError("boto3 is needed for S3 (pip install boto3; EMR nodes have it)") from None
    settings = s3_client_settings(aws, attempts, pool)
    return boto3.client("s3", **{**settings, "config": Config(**settings["config"])})


def glue_client(aws: AwsSettings):
    """The endpoint is found the standard way (AWS_ENDPOINT_URL_GLUE, AWS_ENDPOINT_URL), keys as for S3."""
    import boto3
    from botocore.config import Config

    return boto3.client("glue", region_name=aws.region, aws_access_key_id=aws.access_key,
                        aws_secret_access_key=aws.secret_key, aws_session_token=aws.session_token,
                        config=Config(connect_timeout=5, read_timeout=30,
                                      retries={"max_attempts": GLUE_ATTEMPTS, "mode": "standard"}))


def s3_error(exc: Exception, bucket: str, what: str, endpoint: Optional[str]) -> EtlError:
    """One line for a failed S3 call: what was asked, and S3's own error code."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return EtlError(f"no AWS credentials found for {what}: set them in dl.cfg [AWS] or the environment")
    if isinstance(exc, EndpointConnectionError):
        return EtlError(f"cannot reach S3 at {endpoint or 'the AWS endpoint'} for {what}")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "error")
        if code in ("NoSuchBucket", "404"):
            return EtlError(f"bucket not found: {bucket} (for {what})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return EtlError(f"S3 rejected the credentials ({code}) for {what}")
        return EtlError(f"S3 refused {what}: {code}")
    return EtlError(f"S3 check of {what} failed: {type(exc).__name__}")
