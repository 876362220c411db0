"""Images named by a chat request's image_url parts, fetched under the server's media policy.

    data:image/png;base64,...      always (decoded size at most max_bytes)
    file:///path/to/image.jpg      only under --allowed-local-media-path (symlinks resolved first,
                                   so no path or link leads outside it)
    http(s)://host/image.jpg       only with --allowed-media-domains, for those hosts (a leading
                                   dot allows subdomains too); a total timeout, at most max_bytes
                                   read, redirects followed by hand (at most MAX_REDIRECTS), each
                                   to an allowed host that resolves to public addresses only

Every image is checked against max_pixels from its header before a pixel is decoded (a small
file can declare a 100000 x 100000 image), then decoded, turned upright by its EXIF orientation
and converted to RGB. Each failure is a MediaError naming the request's field.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import ipaddress
import socket
import time
import urllib.parse
from pathlib import Path

from PIL import Image, ImageOps

from vlmfast.processing.color import pil_to_rgb
from vlmfast.processing.loading import DEFAULT_MAX_PIXELS

MAX_REDIRECTS = 3


class MediaError(ValueError):
    """A bad or refused image: message for the client, param the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class MediaPolicy:
    """local_root: the folder file:// URLs may read (None: none). allowed_domains: hosts http(s)
    URLs may name (empty: no fetching). max_bytes: an image's encoded size at most. max_pixels:
    width x height at most (the decompression-bomb limit). timeout_s: a fetch, redirects included."""

    local_root: Path | None = None
    allowed_domains: tuple[str, ...] = ()
    max_bytes: int = 20 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout_s: float = 10.0

    def __post_init__(self):
        if self.local_root is not None:
            root = Path(self.local_root).resolve()
            if not root.is_dir():
                raise ValueError(f"--allowed-local-media-path: {self.local_root} is not a directory")
            self.local_root = root
        self.allowed_domains = tuple(d.strip().lower() for d in self.allowed_domains if d.strip())

    def host_allowed(self, host: str) -> bool:
        host = (host or "").lower().rstrip(".")
        for entry in self.allowed_domains:
            if host == entry.lstrip(".") or (entry.startswith(".") and host.endswith(entry)):
                return True
        return False


def decode_image(data: bytes, max_pixels: int, param: str) -> Image.Image:
    """Encoded bytes -> upright RGB image, the pixel count checked before decoding."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise MediaError(f"{param}: the image is too large to decode ({err})", param) from err
    except Exception as err:  # noqa: BLE001 - not an image Pillow reads
        raise MediaError(f"{param}: not a readable image ({type(err).__name__})", param) from err
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise MediaError(f"{param}: the image is {width}x{height} = {width * height} pixels, more than the "
                             f"server's limit of {max_pixels} (a possible decompression bomb)", param)
        try:
            image.load()
            rgb = pil_to_rgb(ImageOps.exif_transpose(image))
            rgb.load()
        except Exception as err:  # noqa: BLE001 - truncated or corrupt data
            raise MediaError(f"{param}: the image data is corrupt or truncated ({type(err).__name__})", param) from err
    return rgb


def _data_uri(url: str, policy: MediaPolicy, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise MediaError(f"{param}: a data URI needs a ',' before its data", param)
    kinds = header[len("data:"):].split(";")
    if not kinds[0].lower().startswith("image/"):
        raise MediaError(f"{param}: expected a data:image/... URI, got data:{kinds[0]}", param)
    if "base64" not in (k.lower() for k in kinds[1:]):
        raise MediaError(f"{param}: expected a base64 data URI (data:image/...;base64,...)", param)
    if len(payload) * 3 // 4 > policy.max_bytes + 3:
        raise MediaError(f"{param}: the image is larger than the server's limit of {policy.max_bytes} bytes", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MediaError(f"{param}: invalid base64 data ({err})", param) from err


def _local_file(url: str, policy: MediaPolicy, param: str) -> bytes:
    if policy.local_root is None:
        raise MediaError(f"{param}: local files are not enabled on this server (--allowed-local-media-path)", param)
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaError(f"{param}: expected file:///absolute/path, got a host in {url!r}", param)
    try:
        path = Path(urllib.parse.unquote(parsed.path)).resolve(strict=True)  # symlinks followed first
    except (OSError, RuntimeError):
        raise MediaError(f"{param}: no such file under the allowed media folder", param) from None
    if not path.is_relative_to(policy.local_root) or not path.is_file():
        raise MediaError(f"{param}: the file is not under the allowed media folder", param)
    size = path.stat().st_size
    if size > policy.max_bytes:
        raise MediaError(f"{param}: the image is larger than the server's limit of {policy.max_bytes} bytes", param)
    return path.read_bytes()


def _public(host: str, port: int) -> bool:
    """Whether every address host resolves to is a public one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if (address.is_private or address.is_loopback or address.is_link_local or address.is_reserved
                or address.is_multicast or address.is_unspecified):
            return False
    return True


def _fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    import httpx

    if not policy.allowed_domains:
        raise MediaError(f"{param}: fetching images over http(s) is not enabled on this server "
                         "(--allowed-media-domains)", param)
    deadline = time.monotonic() + policy.timeout_s
    with httpx.Client(follow_redirects=False, trust_env=False) as client:
        for hop in range(MAX_REDIRECTS + 1):
            parsed = urllib.parse.urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise MediaError(f"{param}: expected an http(s) URL, got {url!r}", param)
            if not policy.host_allowed(parsed.hostname):
                raise MediaError(f"{param}: the host {parsed.hostname!r} is not in the server's allowed media "
                                 "domains", param)
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            if hop > 0 and not _public(parsed.hostname, port):
                raise MediaError(f"{param}: refused a redirect to a private address ({parsed.hostname})", param)
            left = deadline - time.monotonic()
            if left <= 0:
                raise MediaError(f"{param}: fetching the image timed out", param)
            try:
                with client.stream("GET", url, timeout=left) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise MediaError(f"{param}: a redirect without a Location", param)
                        url = urllib.parse.urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"{param}: fetching the image returned HTTP {response.status_code}", param)
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                        raise MediaError(f"{param}: the image is larger than the server's limit of "
                                         f"{policy.max_bytes} bytes", param)
                    data = bytearray()
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > policy.max_bytes:
                            raise MediaError(f"{param}: the image is larger than the server's limit of "
                                             f"{policy.max_bytes} bytes", param)
                        if time.monotonic() > deadline:
                            raise MediaError(f"{param}: fetching the image timed out", param)
                    return bytes(data)
            except httpx.TimeoutException as err:
                raise MediaError(f"{param}: fetching the image timed out", param) from err
            except httpx.HTTPError as err:
                raise MediaError(f"{param}: fetching the image failed ({type(err).__name__})", param) from err
    raise MediaError(f"{param}: more than {MAX_REDIRECTS} redirects", param)


def load_image_url(url: str, policy: MediaPolicy, param: str) -> Image.Image:
    """An image_url's URL -> an RGB image (see the module doc). Blocking: run it off the event loop."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"{param}: expected a non-empty URL string", param)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        data = _data_uri(url, policy, param)
    elif scheme == "file":
        data = _local_file(url, policy, param)
    elif scheme in ("http", "https"):
        data = _fetch(url, policy, param)
    else:
        raise MediaError(f"{param}: expected a data:, file:// or http(s):// URL, got scheme {scheme!r}", param)
    return decode_image(data, policy.max_pixels, param)

