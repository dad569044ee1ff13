"""A loopback gate in front of the test S3 server that checks presigned requests as S3 does.

moto 5.2.5 checks signatures only on header-signed requests (in its IAM mode a presigned request fails with
KeyError 'HTTP_AUTHORIZATION'), so the tests put this in front of it: a request signed in its query string
(SigV4, as the minio client presigns) is forwarded only if its signature, recomputed by botocore's own SigV4
query signer over the request as received (method, path, query, host) with the server's secret, matches, and
its X-Amz-Date + X-Amz-Expires has not passed; otherwise it gets S3's 403 answer. Header-signed requests
pass through (moto checks those itself when asked to).
"""

from __future__ import annotations

import datetime
import hmac
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ERROR = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"


def presigned_verdict(method: str, path_and_query: str, host: str, access_key: str, secret_key: str,
                      now: datetime.datetime | None = None) -> tuple[str, str] | None:
    """None if a query-signed request is valid; else S3's (error code, message) for it."""
    parts = urlsplit(path_and_query)
    query = parse_qsl(parts.query, keep_blank_values=True)
    params = dict(query)
    try:
        algorithm, credential = params["X-Amz-Algorithm"], params["X-Amz-Credential"]
        stamp, expires, given = params["X-Amz-Date"], int(params["X-Amz-Expires"]), params["X-Amz-Signature"]
    except (KeyError, ValueError):
        return "AccessDenied", "Query-string authentication requires the X-Amz-* parameters"
    key_id, _, region, service, _ = (credential.split("/") + [""] * 5)[:5]
    if algorithm != "AWS4-HMAC-SHA256" or key_id != access_key or service != "s3":
        return "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."
    signed_at = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    if (now or datetime.datetime.now(datetime.timezone.utc)) > signed_at + datetime.timedelta(seconds=expires):
        return "AccessDenied", "Request has expired"
    unsigned = [(k, v) for k, v in query if k != "X-Amz-Signature"]
    request = AWSRequest(method=method, url=f"http://{host}{parts.path}?{urlencode(unsigned)}",
                         headers={"host": host})
    request.context["timestamp"] = stamp
    signer = S3SigV4QueryAuth(Credentials(access_key, secret_key), "s3", region, expires=expires)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(expected, given):
        return "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."
    return None


class Gate:
    """Listens on 127.0.0.1:<port> and forwards to `target` ("host:port") what passes `presigned_verdict`."""

    def __init__(self, target: str, access_key: str, secret_key: str):
        host, port = target.rsplit(":", 1)
        gate = self
        self.refused: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if "X-Amz-Signature=" in self.path:
                    verdict = presigned_verdict(self.command, self.path, self.headers["Host"], access_key,
                                                secret_key)
                    if verdict is not None:
                        gate.refused.append(verdict[0])
                        payload = ERROR.format(code=verdict[0], message=verdict[1]).encode()
                        self.send_response(403)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                upstream = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                reply = upstream.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
