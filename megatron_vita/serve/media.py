"""Media that arrive with a request, turned into the local files a Generator opens.

Owns the media policy of the server: `data:` URLs (base64) are written into a per-request
temporary directory that is removed when the request is done; local paths and `file://` URLs
are accepted only inside `--media-root` (after resolving symlinks, so a link cannot lead out);
http(s) URLs are fetched, size-capped, only with `--allow-remote-media`. Every medium is then
checked with the data pipeline's own readers (an image is decoded, a video probed), so a file
the model could not read is a 4xx naming the part, not an error halfway through generation.

Everything here blocks (decoding, disk, network): the app runs it in a worker thread.
"""
from __future__ import annotations

import base64
import binascii
import mimetypes
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import List, Optional

from megatron_vita.serve.settings import ApiError, ServeSettings

IMAGE = "image"
VIDEO = "video"

# Suffixes for data: URLs whose MIME type mimetypes does not know (decoders look at content, but
# the video reader picks frame directories vs files by the path, and humans read the temp dir).
_SUFFIXES = {"image/jpg": ".jpg", "video/quicktime": ".mov", "video/x-matroska": ".mkv", "video/webm": ".webm"}


class RequestMedia:
    """The media of one request: resolves each part's URL to a checked local path.

    The files live while someone holds them: the request handler from the start, and each queued
    generation job (`hold()`); the last `release()` removes them. So a client that leaves while
    its job runs cannot pull the files from under the Generator.
    """

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self._tmp: Optional[str] = None
        self._holders = 1
        self._lock = threading.Lock()
        self.images: List[str] = []
        self.videos: List[str] = []

    # -- resolving -------------------------------------------------------------------------------

    def add(self, kind: str, url: str, label: str) -> str:
        """Resolve `url` (a part's URL or path) to a local file, check it, and record it in order.
        `label` names the part in error messages (e.g. `messages[0].content[1]`)."""
        self._check_count(kind, label)
        path = self._resolve(kind, url, label)
        check_medium(kind, path, label)
        (self.images if kind == IMAGE else self.videos).append(path)
        return path

    def _resolve(self, kind: str, url: str, label: str) -> str:
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{label}: the {kind} URL must be a non-empty string", param=label, code="invalid_url")
        scheme = urllib.parse.urlsplit(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
        if scheme == "data":
            return self._write_data_url(kind, url, label)
        if scheme in ("http", "https"):
            return self._fetch(kind, url, label)
        if scheme in ("", "file"):
            return self._local(url[len("file://"):] if scheme == "file" else url, label)
        raise ApiError(400, f"{label}: unsupported URL scheme {scheme!r} (data:, file:// or a path under "
                       "--media-root; http(s) with --allow-remote-media)", param=label, code="invalid_url")

    def add_base64(self, kind: str, payload: str, label: str, mime: str = "image/png") -> str:
        """A bare base64 string (the original PUT /api's `image_list`)."""
        if not isinstance(payload, str):
            raise ApiError(400, f"{label}: expected a base64 string", param=label, code="invalid_base64")
        return self.add(kind, f"data:{mime};base64,{payload}", label)

    def add_single_frame_video(self, image_url: str, label: str) -> str:
        """An image used as a one-frame video (the original server's `<video>` tags over
        `image_path_list`): a frame directory holding just that image."""
        self._check_count(VIDEO, label)
        path = self._resolve(IMAGE, image_url, label)
        check_medium(IMAGE, path, label)
        frames = tempfile.mkdtemp(prefix="frames-", dir=self._tmpdir())
        shutil.copyfile(path, os.path.join(frames, "00000" + (os.path.splitext(path)[1] or ".png")))
        check_medium(VIDEO, frames, label)
        self.videos.append(frames)
        return frames

    def _check_count(self, kind: str, label: str) -> None:
        s = self.settings
        have, limit, flag = ((len(self.images), s.max_images, "--max-images") if kind == IMAGE
                             else (len(self.videos), s.max_videos, "--max-videos"))
        if have + 1 > limit:
            raise ApiError(400, f"{label}: more than {limit} {kind}s in one request exceeds the server's limit "
                           f"{flag} {limit}", param=label, code=f"too_many_{kind}s")

    def _tmpdir(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="megatron-vita-serve-")
        return self._tmp

    def _write_data_url(self, kind: str, url: str, label: str) -> str:
        header, sep, payload = url[len("data:"):].partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"{label}: only base64 data: URLs are accepted (data:<mime>;base64,...)",
                           param=label, code="invalid_url")
        mime = header[: -len(";base64")].strip().lower() or "application/octet-stream"
        if mime.split("/")[0] not in (kind, "application"):
            raise ApiError(400, f"{label}: a {kind} part carries a {mime} data: URL", param=label, code="invalid_url")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{label}: the data: URL is not valid base64 ({e})", param=label,
                           code="invalid_base64") from None
        suffix = _SUFFIXES.get(mime) or mimetypes.guess_extension(mime) or (".png" if kind == IMAGE else ".mp4")
        fd, path = tempfile.mkstemp(prefix=f"{kind}-", suffix=suffix, dir=self._tmpdir())
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        return path

    def _local(self, path: str, label: str) -> str:
        root = self.settings.media_root
        if root is None:
            raise ApiError(403, f"{label}: local paths are refused: the server was started without --media-root",
                           param=label, code="media_root")
        root = os.path.realpath(root)
        full = os.path.realpath(os.path.join(root, urllib.parse.unquote(path)))
        if os.path.commonpath([root, full]) != root:
            raise ApiError(403, f"{label}: {path} is outside --media-root {self.settings.media_root}",
                           param=label, code="outside_media_root")
        if not os.path.exists(full):
            raise ApiError(400, f"{label}: {path} does not exist under --media-root", param=label, code="not_found")
        return full

    def _fetch(self, kind: str, url: str, label: str) -> str:
        if not self.settings.allow_remote_media:
            raise ApiError(403, f"{label}: remote URLs are refused (start the server with --allow-remote-media)",
                           param=label, code="remote_media_disabled")
        limit = self.settings.max_request_bytes
        suffix = os.path.splitext(urllib.parse.urlsplit(url).path)[1][:8] or (".png" if kind == IMAGE else ".mp4")
        fd, path = tempfile.mkstemp(prefix=f"{kind}-", suffix=suffix, dir=self._tmpdir())
        try:
            with urllib.request.urlopen(url, timeout=self.settings.remote_timeout_s) as r, os.fdopen(fd, "wb") as f:
                got = 0
                while chunk := r.read(1 << 20):
                    got += len(chunk)
                    if got > limit:
                        raise ApiError(413, f"{label}: the remote {kind} exceeds the server's limit --max-request-mb "
                                       f"{limit / 2**20:g}", param=label, code="remote_media_too_large")
                    f.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ApiError(400, f"{label}: cannot fetch {url}: {e}", param=label, code="remote_media_failed") from None
        return path

    # -- lifetime --------------------------------------------------------------------------------

    def hold(self):
        """One more holder of the files; returns its `release`."""
        with self._lock:
            self._holders += 1
        return self.release

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last and self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def check_medium(kind: str, path: str, label: str) -> None:
    """Decode an image / probe a video with the data pipeline's readers: 400 naming the part when
    the model could not read it (the temp file's name means nothing to the client)."""
    from megatron_vita.data.image import MediaError, open_rgb
    from megatron_vita.data.video import probe_video

    try:
        if kind == IMAGE:
            if os.path.isdir(path):
                raise MediaError(f"{path} is a directory, not an image", "corrupt_image")
            open_rgb(path)
        else:
            probe_video(path)
    except MediaError as e:
        reason = getattr(e, "reason", None) or f"undecodable_{kind}"
        why = str(e).replace(path, f"the {kind}")
        raise ApiError(400, f"{label}: undecodable {kind}: {why}", param=label, code=reason) from None
