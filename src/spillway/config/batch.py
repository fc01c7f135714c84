"""``[batch]``: how batch jobs use idle private capacity, and ``[storage]``: where batch files go.

Kept apart from ``schema.py`` (which imports both); the names are those users write and
``docs/configuration.md`` documents.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

_S3_MIN_PART = 5 * 1024 * 1024


class BatchConfig(BaseModel):
    """Batch jobs (``/v1/batches``): lines run as ordinary requests on spare private capacity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: the share of each private node's ``max_concurrency`` batch lines may fill (at least one
    #: slot); interactive requests may always use the whole of it
    max_share: float = Field(default=0.5, gt=0, le=1.0)
    #: most lines in one input file, and its largest size
    max_lines: int = Field(default=500_000, ge=1)
    max_file_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    #: how often a replica looks for work and for cancellations
    poll_s: float = Field(default=1.0, gt=0, le=10.0)
    #: a batch whose replica stopped renewing its lease this long is taken over by another
    lease_s: float = Field(default=30.0, ge=3.0, le=600.0)
    #: results are made durable (written to storage and recorded) every this many bytes or
    #: ``checkpoint_s``, whichever comes first; a crash re-runs at most the lines since
    checkpoint_bytes: int = Field(default=1024 * 1024, ge=1024)
    checkpoint_s: float = Field(default=2.0, gt=0)
    #: a line whose node failed is tried again this many times before it is an error line
    line_attempts: int = Field(default=3, ge=1, le=20)
    #: unfinished batches one tenant may have at once (429 for more)
    max_active_per_tenant: int = Field(default=100, ge=1)
    #: the longest an upload to /v1/files may take
    upload_timeout_s: float = Field(default=600.0, gt=0)
    #: the completion windows a batch may ask for (OpenAI's is 24h)
    max_window_s: float = Field(default=7 * 86400.0, ge=60)
    #: off: this replica serves the API but runs no batch (another replica does)
    run: bool = True


class StorageConfig(BaseModel):
    """Where uploaded files and batch results are kept: a directory, or an S3-compatible store."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: ``file:///abs/dir`` (default: DATA_DIR/files) or ``s3://bucket/prefix``
    url: str | None = None
    #: an S3-compatible endpoint (MinIO, SeaweedFS, Ceph RGW, Huawei OBS, Alibaba OSS);
    #: None: AWS itself
    endpoint_url: str | None = None
    region: str = "us-east-1"
    #: None: the standard AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and profiles, roles)
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    #: uploads larger than this go up in parts of this size (S3's minimum part is 5 MiB)
    part_bytes: int = Field(default=8 * 1024 * 1024, ge=_S3_MIN_PART)
    #: path-style addressing (bucket in the path): what most self-hosted stores want
    path_style: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme == "file" and parts.path.startswith("/") and not parts.netloc:
            return value
        if parts.scheme == "s3" and parts.netloc:
            return value
        raise ValueError("use file:///ABSOLUTE/DIR or s3://BUCKET[/PREFIX]")
