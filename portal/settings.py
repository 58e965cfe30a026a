"""Settings for the DICOM Exchange portal.

Everything a deployment changes comes from the environment (see README.md). The
defaults serve one machine with nothing else installed: SQLite, files on local
disk, Celery tasks run in the web process.
"""

import ipaddress
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

from portal.env import cache_from_url, env_bool, env_float, env_int, env_list, env_size, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("PORTAL_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG and env_bool("REQUIRE_SECRET_KEY", False):
        raise ImproperlyConfigured("SECRET_KEY must be set in production")
    # The embedded default: a key that is stable across restarts of one
    # installation but never shared between two.
    _key_file = VAR_DIR / "secret_key"
    if not _key_file.exists():
        import secrets

        VAR_DIR.mkdir(parents=True, exist_ok=True)
        _key_file.write_text(secrets.token_urlsafe(50))
        _key_file.chmod(0o600)
    SECRET_KEY = _key_file.read_text().strip()

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
# Behind a TLS-terminating proxy (the production set-up), trust its scheme header, and
# serve HTTPS only: plain HTTP is redirected, browsers are told to come back over HTTPS
# alone (HSTS), cookies go over HTTPS alone. `make run` (plain HTTP on 127.0.0.1) has
# none of this. The health check stays reachable over plain HTTP for load balancers.
if env_bool("BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    # Prometheus scrapes each node directly (README "Metrics and monitoring"), not through the proxy.
    SECURE_REDIRECT_EXEMPT = [r"^api/v1/health$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env_int("HSTS_SECONDS", 365 * 24 * 3600, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("HSTS_PRELOAD", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "centers",
    "routing",
    "studies",
    "corsheaders",
    "dicomweb",
    "axes",
    "drf_spectacular",
    # Swagger UI's files served by the portal itself: clinicians' networks may have no internet.
    "drf_spectacular_sidecar",
]

MIDDLEWARE = [
    "corsheaders.middleware.CorsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes requires: it answers a locked-out login with its page.
    "axes.middleware.AxesMiddleware",
]
# Test only (portal/faults.py): uploads of these SOP Instance UIDs are answered 500, as a bug in
# ingest would answer them. Empty, and the middleware absent, unless a test sets it.
DICOM_FAULT_500_SOP_UIDS = env_list("DICOM_FAULT_500_SOP_UIDS", [])
if DICOM_FAULT_500_SOP_UIDS:
    MIDDLEWARE.append("portal.faults.Fail500ForSopInstances")

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"
ASGI_APPLICATION = "portal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: SQLite by default, PostgreSQL (psycopg 3) in production.
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}")
# No persistent connections: a web process runs requests in up to WEB_THREADS
# threads (portal.bridge), and a connection kept per thread would multiply by
# them. PostgreSQL uses psycopg's pool instead; Celery workers keep theirs
# between tasks (portal.celery).
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        # Parallel uploads would otherwise fail with "database is locked":
        # wait for the writer instead, and take the write lock up front so
        # a read-then-write transaction cannot deadlock on the upgrade.
        "timeout": env_int("SQLITE_BUSY_TIMEOUT", 30),
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;",
    }
else:
    # Without the pool, check a reused connection before a request trusts it.
    _pooled = DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env_bool("DB_POOL", True)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = not _pooled
    if _pooled:
        from psycopg_pool import ConnectionPool

        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            # The pool drops a connection that failed while lent, but after a PostgreSQL
            # restart every idle one is dead and would fail its next request: each loan is
            # checked first (an empty query, one local round trip) and a dead one replaced.
            "check": ConnectionPool.check_connection if env_bool("DB_POOL_CHECK", True) else None,
            "min_size": env_int("DB_POOL_MIN_SIZE", 1, minimum=0),
            # A web process on two cores keeps a handful of queries in flight; 4 web
            # processes x (8 + the idle poll's 5) plus the workers stay under PostgreSQL's
            # default max_connections of 100, which 20 per process exhausted under load.
            "max_size": env_int("DB_POOL_MAX_SIZE", 8, minimum=1),
            # Connections a burst opened are closed again after a minute unused.
            "max_idle": env_float("DB_POOL_MAX_IDLE", 60, minimum=1),
            "timeout": env_float("DB_POOL_TIMEOUT", 30, minimum=1),
        }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Storage of DICOM bytes: local disk by default, S3 (django-storages) by setting.
STORAGE_BACKEND = env_str("STORAGE_BACKEND", "local")
DICOM_STORAGE_DIR = Path(env_str("DICOM_STORAGE_DIR", str(VAR_DIR / "storage")))
if STORAGE_BACKEND == "local":
    _dicom_storage = {
        "BACKEND": "portal.storage.DurableFileSystemStorage",
        "OPTIONS": {"location": str(DICOM_STORAGE_DIR), "file_permissions_mode": 0o640},
    }
elif STORAGE_BACKEND == "s3":
    from boto3.s3.transfer import TransferConfig

    # An upload goes to the bucket from its spool file in 8 MB parts, each read into memory
    # first: at most four read ahead, so a web process's memory does not grow with the file
    # (a 160 MB upload: ~70 MB here, ~110 MB with boto3's default of ten).
    _transfer = TransferConfig(max_concurrency=4)
    _transfer.max_in_memory_upload_chunks = 4
    _dicom_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env_str("S3_BUCKET"),
            "endpoint_url": env_str("S3_ENDPOINT_URL") or None,
            "region_name": env_str("S3_REGION") or None,
            "access_key": env_str("S3_ACCESS_KEY_ID") or None,
            "secret_key": env_str("S3_SECRET_ACCESS_KEY") or None,
            "location": env_str("S3_PREFIX", "dicom"),
            # "path" for servers that answer on one host name (MinIO, a proxy); AWS needs none.
            "addressing_style": env_str("S3_ADDRESSING_STYLE") or None,
            "signature_version": "s3v4",
            "default_acl": None,
            "file_overwrite": False,
            # A file read from the bucket (render, ZIP, WADO) is copied to a temporary file
            # first; past this size it goes to disk, not memory (the default keeps it all in memory).
            "max_memory_size": 1024 * 1024,
            "transfer_config": _transfer,
        },
    }
    if not _dicom_storage["OPTIONS"]["bucket_name"]:
        raise ImproperlyConfigured("STORAGE_BACKEND=s3 needs S3_BUCKET")
else:
    raise ImproperlyConfigured(f"STORAGE_BACKEND={STORAGE_BACKEND!r}: use 'local' or 's3'")
STORAGES = {
    "default": _dicom_storage,
    "dicom": _dicom_storage,
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# With CACHE_URL=redis://... the API's rate-limit counters (centers.ratelimit) live in that
# Redis, shared by every web process; with any other CACHE_URL each process counts on its
# own, so each of `make run`'s processes allows the full rate.
CACHES = {
    "default": cache_from_url(env_str("CACHE_URL")),
    "renders": {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": env_str("RENDER_CACHE_DIR", str(VAR_DIR / "render-cache")),
        "TIMEOUT": env_int("RENDER_CACHE_SECONDS", 7 * 24 * 3600, minimum=1),
        "OPTIONS": {"MAX_ENTRIES": env_int("RENDER_CACHE_ENTRIES", 20000, minimum=100)},
    },
}

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
FILE_UPLOAD_TEMP_DIR = env_str("FILE_UPLOAD_TEMP_DIR") or None

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Repeated failed logins (the clinicians' page and the admin's alike, both go through
# authenticate()) lock that username from that address out for a while (django-axes,
# its attempts kept in the database so every web process sees them). The address is
# REMOTE_ADDR, which uvicorn takes from X-Forwarded-For when the proxy is on 127.0.0.1
# (its --forwarded-allow-ips default).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_float("LOGIN_LOCKOUT_MINUTES", 15, minimum=0.1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "portal.views.login_locked_out"
# Successful logins are already in Django's own records; only failures are kept.
AXES_DISABLE_ACCESS_LOG = True
LOGIN_URL = "studies:login"
LOGIN_REDIRECT_URL = "studies:received"
LOGOUT_REDIRECT_URL = "studies:login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["centers.auth.CenterKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["centers.auth.IsCenterAgent"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "portal.api.exception_handler",
    "UNAUTHENTICATED_USER": None,
    # Per center key (API_RATE_LIMIT), for what portal.bridge has not counted; a 429 carries Retry-After.
    "DEFAULT_THROTTLE_CLASSES": ["centers.throttling.CenterKeyRateThrottle"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
# The API's OpenAPI 3 contract (/api/v1/schema) and its docs page (/api/v1/docs), README "The API contract".
SPECTACULAR_SETTINGS = {
    "TITLE": "DICOM Exchange API",
    "DESCRIPTION": "The API the site agents use: publish instances, lease, fetch and acknowledge deliveries, "
    "report heartbeats. Every request carries a center key as `Authorization: Bearer <key>`; every error "
    'answers `{"error": "<sentence>"}`.',
    "VERSION": "1",
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "SERVE_INCLUDE_SCHEMA": False,
    # The contract is no secret: anyone may read it, without a key.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}
# Requests per key: <n>/s, /m, /h or /d; empty turns the limit off. The default is above
# what one agent sends on a LAN (`make bench`: about 90 uploads a second from one key);
# idle polls answered by routing.idle_poll never reach it.
API_RATE_LIMIT = env_str("API_RATE_LIMIT", "200/s")

# The exchange itself.
DICOM_MAX_UPLOAD_BYTES = env_size("DICOM_MAX_UPLOAD_BYTES", 2 * 1024**3)
DELIVERY_LEASE_SECONDS = env_int("DELIVERY_LEASE_SECONDS", 300, minimum=1)
DELIVERY_POLL_INTERVAL = env_float("DELIVERY_POLL_INTERVAL", 0.5, minimum=0.05)
# Threads per web process running Django (portal.bridge); a waiting long poll holds one.
WEB_THREADS = env_int("WEB_THREADS", 200, minimum=1)
SWEEP_INTERVAL_SECONDS = env_float("SWEEP_INTERVAL_SECONDS", 60, minimum=0.5)
SWEEP_GRACE_SECONDS = env_float("SWEEP_GRACE_SECONDS", 30, minimum=0)
# What can never succeed ends in a state the centers and the administrator see
# (README "Administration"), instead of being retried out of sight forever.
DELIVERY_MAX_MISMATCHES = env_int("DELIVERY_MAX_MISMATCHES", 5, minimum=1)
DELIVERY_MAX_LEASES = env_int("DELIVERY_MAX_LEASES", 100, minimum=0)
TASK_MAX_RETRIES = env_int("TASK_MAX_RETRIES", 8, minimum=0)
TASK_RETRY_DELAY_SECONDS = env_float("TASK_RETRY_DELAY_SECONDS", 10, minimum=0)
# Stored files no row names (a process killed between the write and the commit).
# The grace keeps the sweep away from uploads in flight; it only lists the day
# folders of the last ORPHAN_SWEEP_DAYS days before the grace's edge.
ORPHAN_GRACE_SECONDS = env_float("ORPHAN_GRACE_SECONDS", 3600, minimum=60)
ORPHAN_SWEEP_DAYS = env_int("ORPHAN_SWEEP_DAYS", 1, minimum=0)
ORPHAN_SWEEP_BATCH = env_int("ORPHAN_SWEEP_BATCH", 1000, minimum=1)
ORPHAN_SWEEP_INTERVAL_SECONDS = env_float("ORPHAN_SWEEP_INTERVAL_SECONDS", 3600, minimum=1)
# deliver: study. A study is stable once no instance of it arrived for this long (Orthanc's
# StableAge, mercure's completion timeout); only then are whole-study deliveries leased.
STUDY_STABLE_SECONDS = env_float("STUDY_STABLE_SECONDS", 60, minimum=0)
# The webhook a center may register for studies complete for it: each POST waits at most
# WEBHOOK_TIMEOUT_SECONDS; a failed one is tried again after WEBHOOK_RETRY_SECONDS, doubling
# each time (at most an hour), until WEBHOOK_MAX_ATTEMPTS attempts have failed.
WEBHOOK_TIMEOUT_SECONDS = env_float("WEBHOOK_TIMEOUT_SECONDS", 10, minimum=0.5)
WEBHOOK_RETRY_SECONDS = env_float("WEBHOOK_RETRY_SECONDS", 30, minimum=0.1)
WEBHOOK_MAX_ATTEMPTS = env_int("WEBHOOK_MAX_ATTEMPTS", 10, minimum=1)
# The address agents and viewers use to reach the portal; when empty, links are
# built from the request.
PORTAL_PUBLIC_URL = env_str("PORTAL_PUBLIC_URL").rstrip("/")
# Behind nginx with local storage: the URL prefix of an `internal` location that
# aliases DICOM_STORAGE_DIR. Downloads are then authorised and audited here and
# the bytes are sent by nginx (X-Accel-Redirect), not through Python.
DICOM_ACCEL_REDIRECT = env_str("DICOM_ACCEL_REDIRECT")
# Behind nginx with local storage and its secure_link module: the secret shared
# with nginx. A lease then hands out download links signed until the lease ends,
# and nginx serves them with no request to the portal; the lease is the audited
# grant. DICOM_DOWNLOAD_LINK_PREFIX is the nginx location that checks them.
DICOM_DOWNLOAD_LINK_SECRET = env_str("DICOM_DOWNLOAD_LINK_SECRET")
DICOM_DOWNLOAD_LINK_PREFIX = "/" + env_str("DICOM_DOWNLOAD_LINK_PREFIX", "/dl/").strip("/") + "/"
if DICOM_DOWNLOAD_LINK_SECRET and STORAGE_BACKEND != "local":
    raise ImproperlyConfigured("DICOM_DOWNLOAD_LINK_SECRET needs STORAGE_BACKEND=local (nginx reads the files)")
# With S3: a lease hands out presigned GET URLs of the bucket, valid until the lease
# ends, so agents fetch the bytes from S3 itself and no download passes through the
# portal; the lease is the audited grant. Off, downloads go through the portal.
S3_PRESIGNED_DOWNLOADS = STORAGE_BACKEND == "s3" and env_bool("S3_PRESIGNED_DOWNLOADS", True)
if DICOM_ACCEL_REDIRECT and STORAGE_BACKEND != "local":
    raise ImproperlyConfigured("DICOM_ACCEL_REDIRECT needs STORAGE_BACKEND=local (nginx reads the files)")
# DICOMweb for a viewer served from another origin (e.g. OHIF): the origins
# allowed to call /dicomweb/ from a browser, comma-separated; none by default.
CORS_ALLOWED_ORIGINS = env_list("DICOMWEB_CORS_ORIGINS", [])
CORS_URLS_REGEX = r"^/dicomweb/.*$"
CORS_ALLOW_CREDENTIALS = env_bool("DICOMWEB_CORS_CREDENTIALS", False)
CORS_EXPOSE_HEADERS = ["Content-Type", "Content-Length", "Warning"]

# /metrics (portal.metrics, README "Metrics and monitoring"): served only to a scrape carrying
# `Authorization: Bearer <METRICS_TOKEN>` or coming from METRICS_ALLOWED_ADDRESSES (addresses or
# networks, comma-separated); with neither set, to no one. Several web processes share their
# counters through PROMETHEUS_MULTIPROC_DIR, which prometheus-client reads from the environment.
METRICS_TOKEN = env_str("METRICS_TOKEN")
METRICS_ALLOWED_ADDRESSES = env_list("METRICS_ALLOWED_ADDRESSES", [])
for _address in METRICS_ALLOWED_ADDRESSES:
    try:
        ipaddress.ip_network(_address, strict=False)
    except ValueError:
        raise ImproperlyConfigured(f"METRICS_ALLOWED_ADDRESSES: {_address!r} is no address or network") from None
# The Celery queue's depth: one bounded question to RabbitMQ per this many seconds and process.
METRICS_BROKER_TIMEOUT = env_float("METRICS_BROKER_TIMEOUT", 1, minimum=0.1)
METRICS_BROKER_CACHE_SECONDS = env_float("METRICS_BROKER_CACHE_SECONDS", 5, minimum=0)

# Celery: RabbitMQ in production; without a broker, tasks run eagerly in the
# web process and failures propagate (so a failed fan-out is never silent).
CELERY_TASK_ALWAYS_EAGER = not env_str("CELERY_BROKER_URL")
# One URL, or a RabbitMQ cluster's nodes as a ';'-separated list
# (amqp://u:p@mq1//;amqp://u:p@mq2//): Celery (kombu) connects to the first that
# answers and moves round-robin to the next when its node goes away.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL") or "memory://"
CELERY_TASK_EAGER_PROPAGATES = True
# One broker can serve several portals (or test runs) with their own queues.
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_QUEUE", "dicom-exchange")
# "quorum" replicates the task queue over a cluster's nodes (Raft), so a node's loss
# loses no queued task; "classic" is the single-node set-up. RabbitMQ cannot change
# an existing queue's type: switching needs a new CELERY_QUEUE name.
_queue_type = env_str("CELERY_QUEUE_TYPE", "classic").strip().lower() or "classic"
if _queue_type not in ("classic", "quorum"):
    raise ImproperlyConfigured(f"CELERY_QUEUE_TYPE={_queue_type!r}: use classic or quorum")
CELERY_TASK_DEFAULT_QUEUE_TYPE = _queue_type
CELERY_TASK_DEFAULT_EXCHANGE_TYPE = "direct"
if _queue_type == "quorum":
    # Quorum queues refuse a channel-wide (global) prefetch: the worker uses per-consumer QoS.
    CELERY_WORKER_DETECT_QUORUM_QUEUES = True
    # Retries with a countdown then wait in RabbitMQ's delayed-delivery queues (quorum too),
    # which route only through a topic exchange; on a direct one the worker would hold them.
    CELERY_TASK_DEFAULT_EXCHANGE_TYPE = "topic"
# Stat fan-outs (and their de-identified copies) go to a queue of their own, so they never
# wait behind a backlog of routine ones: a worker started with `-Q <this queue>` serves only
# them, and a worker started without -Q serves both queues, so stat work is done even where
# no stat worker runs. Declared like the main queue (same type, same kind of exchange).
CELERY_STAT_QUEUE = env_str("CELERY_STAT_QUEUE") or f"{CELERY_TASK_DEFAULT_QUEUE}-stat"
if CELERY_STAT_QUEUE == CELERY_TASK_DEFAULT_QUEUE:
    raise ImproperlyConfigured("CELERY_STAT_QUEUE must differ from CELERY_QUEUE")
CELERY_TASK_QUEUES = [
    Queue(
        _name,
        Exchange(_name, CELERY_TASK_DEFAULT_EXCHANGE_TYPE),
        routing_key=_name,
        queue_arguments={"x-queue-type": "quorum"} if _queue_type == "quorum" else None,
    )
    for _name in (CELERY_TASK_DEFAULT_QUEUE, CELERY_STAT_QUEUE)
]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}
CELERY_BROKER_CONNECTION_TIMEOUT = env_float("CELERY_BROKER_CONNECTION_TIMEOUT", 2, minimum=0.1)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# An upload must not hang while the broker is down: publish fails fast, the
# instance is already committed, and the sweep routes it later.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
CELERY_BEAT_SCHEDULE = {
    "route-pending-instances": {"task": "routing.tasks.sweep_unrouted", "schedule": SWEEP_INTERVAL_SECONDS},
    "expire-delivery-leases": {"task": "routing.tasks.expire_leases", "schedule": SWEEP_INTERVAL_SECONDS},
    "deidentify-pending-copies": {"task": "routing.tasks.sweep_pending_copies", "schedule": SWEEP_INTERVAL_SECONDS},
    "sweep-orphan-files": {"task": "routing.tasks.sweep_orphan_files", "schedule": ORPHAN_SWEEP_INTERVAL_SECONDS},
    "study-webhooks": {"task": "routing.tasks.study_webhooks", "schedule": SWEEP_INTERVAL_SECONDS},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
