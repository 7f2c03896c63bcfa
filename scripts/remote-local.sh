#!/usr/bin/env bash
# Object-storage servers on this machine for the remote-cache tests and for
# trying `remote:`: `scripts/remote-local.sh up` makes a private venv with
# moto's S3 server from PyPI (.venv-remote/, once; the server boto's and DVC's
# own tests use) and starts it on 127.0.0.1:${R1PIPE_S3_PORT:-5555}, then (as
# root) an Apache WebDAV server from Debian's apache2 on
# 127.0.0.1:${R1PIPE_DAV_PORT:-8089}/cache/ serving .venv-remote/dav/, and
# beside it /private/, the same behind HTTP Basic authentication (user
# `r1pipe`, password `r1pipe-dav`: for the wrong-credentials tests), and a
# second moto on 127.0.0.1:${R1PIPE_S3_AUTH_PORT:-5556} that checks
# credentials as S3 does (moto's IAM mode): one user, whose key is written to
# .venv-remote/s3-auth.env with a bucket `r1pipe-auth` it may use; any other
# key is refused. Each is waited for; `down` stops them all. Idempotent.
# A server on one of these ports that another checkout started is stopped and
# replaced; anything else there is refused. Prints the addresses.
# Use it with: AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
#   r1pipe run P.yaml --remote s3://BUCKET/PREFIX  (and `remote: {url, endpoint}` or AWS_ENDPOINT_URL)
set -euo pipefail
cmd=${1:-up}
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-remote"
# shellcheck source=scripts/venv.sh
. "$root/scripts/venv.sh"
port=${R1PIPE_S3_PORT:-5555}
endpoint="http://127.0.0.1:$port"
pidfile="$venv/moto.pid"
dav_port=${R1PIPE_DAV_PORT:-8089}
dav_url="http://127.0.0.1:$dav_port/cache/"

answers() { "$venv/bin/python" -c "import urllib.request; urllib.request.urlopen('$endpoint/', timeout=3)" 2>/dev/null; }

# A WebDAV folder answers OPTIONS with the DAV methods it takes.
dav_answers() {
  "$venv/bin/python" -c "import urllib.request as u, sys; r = u.urlopen(u.Request('$dav_url', method='OPTIONS'), timeout=3); sys.exit('PROPFIND' not in r.headers.get('Allow', ''))" 2>/dev/null
}

# Apache with mod_dav_fs, from a configuration of its own (the system's is untouched).
dav_up() {
  local claim=0
  if dav_answers; then claim_port "$dav_port" "$venv" remote-local || claim=$?; fi
  if [ "$claim" = 1 ]; then return 1; fi
  if [ "$claim" = 0 ] && dav_answers; then
    echo "remote-local: WebDAV already up at $dav_url" >&2
    return
  fi
  if ! command -v apache2 >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq apache2 >/dev/null) \
      || { echo "remote-local: apache2 is not installable here; no WebDAV server" >&2; return 1; }
  fi
  local dir="$venv/dav"
  mkdir -p "$dir/cache" "$dir/private" "$dir/run" "$dir/lock"
  chown -R www-data:www-data "$dir/cache" "$dir/private" "$dir/lock" 2>/dev/null || true
  # Apache's {SHA} form (base64 of SHA-1), made without apache2-utils' htpasswd.
  python3 -c "import base64, hashlib; print('r1pipe:{SHA}' + base64.b64encode(hashlib.sha1(b'r1pipe-dav').digest()).decode())" \
    > "$dir/users"
  cat > "$dir/httpd.conf" <<CONF
ServerRoot /etc/apache2
ServerName 127.0.0.1
Listen 127.0.0.1:$dav_port
PidFile $dir/run/httpd.pid
ErrorLog $dir/error.log
User www-data
Group www-data
LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule alias_module /usr/lib/apache2/modules/mod_alias.so
LoadModule dav_module /usr/lib/apache2/modules/mod_dav.so
LoadModule dav_fs_module /usr/lib/apache2/modules/mod_dav_fs.so
LoadModule authn_core_module /usr/lib/apache2/modules/mod_authn_core.so
LoadModule authn_file_module /usr/lib/apache2/modules/mod_authn_file.so
LoadModule auth_basic_module /usr/lib/apache2/modules/mod_auth_basic.so
LoadModule authz_user_module /usr/lib/apache2/modules/mod_authz_user.so
DavLockDB $dir/lock/DavLock
Alias /cache $dir/cache
<Directory $dir/cache>
  Dav On
  Require all granted
</Directory>
Alias /private $dir/private
<Directory $dir/private>
  Dav On
  AuthType Basic
  AuthName "r1pipe remote"
  AuthUserFile $dir/users
  Require valid-user
</Directory>
CONF
  apache2 -f "$dir/httpd.conf" -k start >&2
  for _ in $(seq 1 40); do dav_answers && break; sleep 0.25; done
  dav_answers || { echo "remote-local: WebDAV did not answer at $dav_url (log: $dir/error.log)" >&2; return 1; }
  echo "remote-local: WebDAV up at $dav_url" >&2
}

# The S3 server that checks credentials. moto's IAM mode lets the first
# INITIAL_NO_AUTH_ACTION_COUNT requests through unsigned: the three that make
# the user, its key and its policy; from then on every request must be signed
# by that key.
auth_port=${R1PIPE_S3_AUTH_PORT:-5556}
auth_endpoint="http://127.0.0.1:$auth_port"
auth_pidfile="$venv/moto-auth.pid"
auth_answers() { "$venv/bin/python" -c "import urllib.request; urllib.request.urlopen('$auth_endpoint/moto-api/', timeout=3)" 2>/dev/null; }
auth_up() {
  local claim=0
  if auth_answers; then claim_port "$auth_port" "$venv" remote-local || claim=$?; fi
  if [ "$claim" = 1 ]; then return 1; fi
  if [ "$claim" = 0 ] && [ -f "$venv/s3-auth.env" ] && auth_answers; then
    echo "remote-local: credential-checking S3 already up at $auth_endpoint" >&2
    return
  fi
  rm -f "$venv/s3-auth.env"
  INITIAL_NO_AUTH_ACTION_COUNT=3 setsid "$venv/bin/moto_server" -H 127.0.0.1 -p "$auth_port" \
    > "$venv/moto-auth.log" 2>&1 < /dev/null &
  echo $! > "$auth_pidfile"
  "$venv/bin/python" - "$auth_endpoint" "$venv/s3-auth.env" <<'PY' || { echo "remote-local: the credential-checking S3 did not start (log: $venv/moto-auth.log)" >&2; return 1; }
import json, sys, time, urllib.request
import boto3
endpoint, out = sys.argv[1], sys.argv[2]
for _ in range(60):
    try:
        urllib.request.urlopen(endpoint + "/moto-api/", timeout=3)
        break
    except Exception:
        time.sleep(0.5)
anon = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **anon)
iam.create_user(UserName="r1pipe")
key = iam.create_access_key(UserName="r1pipe")["AccessKey"]
policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
iam.put_user_policy(UserName="r1pipe", PolicyName="s3", PolicyDocument=json.dumps(policy))
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
s3.create_bucket(Bucket="r1pipe-auth")
with open(out, "w") as f:
    f.write(f"AWS_ACCESS_KEY_ID={key['AccessKeyId']}\nAWS_SECRET_ACCESS_KEY={key['SecretAccessKey']}\n")
PY
  echo "remote-local: credential-checking S3 up at $auth_endpoint (key in $venv/s3-auth.env)" >&2
}

down() {
  if [ -f "$venv/dav/httpd.conf" ]; then apache2 -f "$venv/dav/httpd.conf" -k stop 2>/dev/null || true; fi
  for f in "$pidfile" "$auth_pidfile"; do
    if [ -f "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; fi
  done
  rm -f "$venv/s3-auth.env"
  echo "remote-local: stopped" >&2
}

up() {
  pinned_venv "$venv" remote-local "moto[server]==5.2.5"
  dav_up || true
  auth_up || true
  local claim=0
  if answers; then claim_port "$port" "$venv" remote-local || claim=$?; fi
  if [ "$claim" = 1 ]; then exit 1; fi
  if [ "$claim" = 0 ] && answers; then
    echo "remote-local: S3 already up at $endpoint" >&2
    echo "$endpoint $dav_url"
    return
  fi
  # Its own session: it outlives this script, and `down` stops it by its pid.
  setsid "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" > "$venv/moto.log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  for _ in $(seq 1 60); do answers && break; sleep 0.5; done
  if ! answers; then
    echo "remote-local: the server did not answer at $endpoint (log: $venv/moto.log)" >&2
    exit 1
  fi
  echo "remote-local: S3 up at $endpoint" >&2
  echo "$endpoint $dav_url"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: scripts/remote-local.sh up|down" >&2; exit 2 ;;
esac
