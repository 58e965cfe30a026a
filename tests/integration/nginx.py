"""A real nginx in front of one or more portal processes, as deployed: its own config in a tmp folder."""

import getpass
import shutil
from pathlib import Path

import httpx

from tests.integration.stack import Process, Stack, free_port, wait_for

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

# `user` keeps a root-started nginx's workers as the user that owns the 0640
# stored files (a deployment puts nginx in the portal's group instead); nginx
# started by another user ignores it.
CONF = """
user {user};
daemon off;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  upstream portal {{
{servers}
  }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 100m;
    location / {{
      proxy_pass http://portal;
      proxy_set_header Host $http_host;
      proxy_request_buffering off;
      # A node that refuses or drops the connection: the request goes to the next one.
      # An upload whose body was already streamed to a dying node cannot be replayed
      # (no request buffering); the agent gets a 502 and sends it again.
      proxy_next_upstream error timeout http_502 http_503;
      # Outlasts the agents' long poll (at most 60 s).
      proxy_read_timeout 90s;
    }}
    location /_dicom/ {{
      internal;
      alias {storage}/;
    }}
{links}
  }}
}}
"""


def nginx_start(stack: Stack, tmp: Path, *, upstreams: list[int], links: str = "") -> tuple[Process, str]:
    """Start nginx balancing over the portal processes on `upstreams`; returns it and its URL."""
    port = free_port()
    # fail_timeout: a node that failed is left alone that long before nginx tries it again.
    servers = "\n".join(f"    server 127.0.0.1:{upstream} max_fails=1 fail_timeout=30s;" for upstream in upstreams)
    conf = tmp / "nginx.conf"
    conf.write_text(
        CONF.format(
            user=getpass.getuser(),
            tmp=tmp,
            port=port,
            servers=servers,
            storage=stack.env["DICOM_STORAGE_DIR"],
            links=links,
        )
    )
    nginx = stack.spawn("nginx", [NGINX, "-c", str(conf), "-p", str(tmp)])
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: up(url), what="nginx")
    return nginx, url


def up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False
