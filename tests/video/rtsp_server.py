"""An RTSP server for the stream tests: plays one H.264 file (Matroska or MP4, e.g. written by
``tests.video.scene.write_h264``) in real time, looping forever, to any number of clients.

Run with Debian's Python, which has GStreamer's bindings (python3-gi,
gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-{base,good,bad}); the venv has neither::

    /usr/bin/python3 tests/video/rtsp_server.py --port 8554 --file scene.mkv [--path /scene]

It prints ``READY`` once it listens and exits on SIGTERM or SIGINT. ``RtspServer`` below starts
it from a test (the venv's Python) and stops, kills and restarts it on the same port. This
module imports nothing outside the standard library at its top: both Pythons load it.

How it loops: one shared media per mount; once prerolled, the demuxer is sent a flushing
*segment* seek to 0, so at the file's end it posts SEGMENT_DONE instead of EOS, and each
SEGMENT_DONE is answered with another (non-flushing) segment seek to 0. Running time, and so
the RTP timestamps, keep growing across loops; the sinks' clock sync paces the frames at the
file's rate. Clients cannot seek: one joining later sees the stream where it is, as with a
camera (from the next keyframe).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEBIAN_PYTHON = "/usr/bin/python3"
SCRIPT = Path(__file__).resolve()


def _serve(port: int, file: Path, mount: str) -> int:
    import gi  # type: ignore[import-not-found, unused-ignore]

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import (  # type: ignore[import-not-found, unused-ignore]
        GLib,
        Gst,
        GstRtspServer,
    )

    Gst.init(None)

    def payloader_input(media: Any) -> Any:
        return media.get_element().get_by_name("pay0").get_static_pad("sink")

    def seek_to_start(media: Any, flush: bool) -> bool:
        # Sent upstream from the payloader's input: a pipeline-level seek does not get
        # through the RTP bin to the demuxer.
        flags = Gst.SeekFlags.SEGMENT | (Gst.SeekFlags.FLUSH if flush else Gst.SeekFlags.NONE)
        event = Gst.Event.new_seek(1.0, Gst.Format.TIME, flags, Gst.SeekType.SET, 0,
                                   Gst.SeekType.NONE, -1)
        return bool(payloader_input(media).push_event(event))

    last_pts: dict[int, int] = {}  # id(media) -> the last frame's timestamp (stream time)

    class LoopingMedia(GstRtspServer.RTSPMedia):  # type: ignore[misc]
        def do_handle_message(self, message: Any) -> bool:
            if message.type == Gst.MessageType.SEGMENT_DONE:
                # A non-flushing seek starts the next loop's running time at the last
                # frame's timestamp, not at the file's end: the first frame would share the
                # last one's time. Shift what follows by the difference (one frame).
                _, end = message.parse_segment_done()
                pad = payloader_input(self)
                gap = end - last_pts.get(id(self), end)
                if 0 < gap < Gst.SECOND:
                    pad.set_offset(pad.get_offset() + gap)
                # The demuxer's task has paused at the segment's end: a non-flushing seek
                # does not block here, and playback goes on without a gap.
                seek_to_start(self, flush=False)
                return True
            return bool(GstRtspServer.RTSPMedia.do_handle_message(self, message))

    def on_prepared(media: Any) -> None:
        # Flushing: the pipeline is prerolled (PAUSED), where a non-flushing seek would wait
        # for the blocked streaming thread forever.
        if not seek_to_start(media, flush=True):
            print("warning: the initial segment seek failed; the file will not loop",
                  file=sys.stderr, flush=True)

    def on_media_configure(_factory: Any, media: Any) -> None:
        def remember_pts(_pad: Any, info: Any) -> Any:
            pts = info.get_buffer().pts
            if pts != Gst.CLOCK_TIME_NONE:
                last_pts[id(media)] = pts
            return Gst.PadProbeReturn.OK

        payloader_input(media).add_probe(Gst.PadProbeType.BUFFER, remember_pts)
        media.connect("prepared", on_prepared)
        media.connect("unprepared", lambda m: last_pts.pop(id(m), None))

    factory = GstRtspServer.RTSPMediaFactory()
    # parsebin picks the demuxer (Matroska, MP4) and the H.264 parser.
    location = str(file).replace("\\", "\\\\").replace('"', '\\"')
    factory.set_launch(f'( filesrc location="{location}" ! parsebin '
                       "! rtph264pay name=pay0 pt=96 config-interval=1 )")
    factory.set_shared(True)  # one pipeline for every client: they see the same frames
    # Unseekable, as a camera is: a client's PLAY carries a Range (FFmpeg's npt=0.000-), and a
    # seek would restart the shared file for every client, and end it (no SEGMENT flag). This
    # mode is what makes GstRTSPMedia refuse seeks (it keeps PLAY working).
    factory.set_publish_clock_mode(GstRtspServer.RTSPPublishClockMode.CLOCK_AND_OFFSET)
    factory.set_media_gtype(LoopingMedia.__gtype__)
    factory.connect("media-configure", on_media_configure)

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    server.get_mount_points().add_factory(mount, factory)
    if not server.attach(None):  # binds here (with SO_REUSEADDR, so a restart can rebind)
        print(f"cannot listen on 127.0.0.1:{port}", file=sys.stderr, flush=True)
        return 1

    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, loop.quit)
    print("READY", flush=True)
    loop.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", type=Path, required=True, help="H.264 in .mkv or .mp4")
    parser.add_argument("--path", default="/scene", help="the mount point")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        parser.error(f"no such file: {args.file}")
    return _serve(args.port, args.file.resolve(), args.path)


# --- from the tests (the venv's Python) ---------------------------------------------------


def gstreamer_missing() -> str | None:
    """Why the server cannot run here, or None when it can."""
    if not shutil.which(DEBIAN_PYTHON):
        return f"{DEBIAN_PYTHON} is missing"
    check = ("import gi; gi.require_version('Gst', '1.0'); "
             "gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "import sys; sys.exit(0 if all(Gst.ElementFactory.find(e) for e in "
             "('parsebin', 'matroskademux', 'qtdemux', 'h264parse', 'rtph264pay')) else 3)")
    result = subprocess.run([DEBIAN_PYTHON, "-c", check], capture_output=True, timeout=60)
    if result.returncode != 0:
        return ("GStreamer's RTSP server is not installed for Debian's Python (python3-gi, "
                "gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-base/-good/-bad; "
                f"`make tools`): {result.stderr.decode(errors='replace').strip()[-300:]}")
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RtspServer:
    """This script in a subprocess, for a test: ``with RtspServer(file) as rtsp: rtsp.url``.
    ``stop()`` (SIGTERM), ``kill()`` (SIGKILL, mid-stream) and ``start()`` again, on the same
    port. Its output goes to ``log_path`` (beside the file unless given)."""

    def __init__(self, file: Path, port: int | None = None, path: str = "/scene",
                 log_path: Path | None = None, ready_timeout_s: float = 30.0) -> None:
        self.file = file
        self.port = port or _free_port()
        self.path = path
        self.log_path = log_path or file.with_name(f"rtsp-{self.port}.log")
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start and wait for READY. Right after a kill the port can still be held by the
        dying process for a moment: a start that cannot bind is retried until the deadline."""
        assert self.process is None, "already running"
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as log:  # its READY line too: no pipe to drain
                process = subprocess.Popen(
                    [DEBIAN_PYTHON, str(SCRIPT), "--port", str(self.port), "--file",
                     str(self.file), "--path", self.path],
                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": ""})
            while process.poll() is None and time.monotonic() < deadline:
                if "READY" in self._log_since(offset).splitlines():
                    self.process = process
                    return
                time.sleep(0.05)
            if process.poll() is None:  # silent past the deadline
                process.kill()
                process.wait(10)
            if time.monotonic() > deadline or "cannot listen" not in self._log_since(offset):
                raise RuntimeError(f"the RTSP server did not start (exit {process.returncode}):"
                                   f"\n{self.log()}")
            time.sleep(0.2)

    def _log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def _end(self, signum: int) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def stop(self) -> None:
        """SIGTERM, and wait for it to exit."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-stream, as a crashed camera does."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        self.kill()
        self.start()

    def __enter__(self) -> RtspServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
