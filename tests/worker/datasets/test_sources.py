"""Data sets named by a source: s3:// against the loopback S3 server, https:// against local
HTTP(S) servers (address checks, redirects, size limit, TLS name), hf:// through `datasets` on a
local directory (never the network)."""

from __future__ import annotations

import datetime
import io
import ipaddress
import socket
import ssl
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from app import net
from app.config import Settings
from app.net import refused_address
from tests.conftest import s3_client
from worker.datasets import Member, PreparationFailed, Skipped, sources
from worker.datasets.sources import download, source_members


def png(width: int = 10, height: int = 12, shade: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 100, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def collect(members: Iterator[Member | Skipped]) -> dict[str, bytes | str]:
    """name -> the member's bytes, or the reason it was skipped."""
    return {m.name: (m.reason if isinstance(m, Skipped) else m.read()) for m in members}


# --- s3:// -----------------------------------------------------------------------------------
def test_s3_source_yields_images_and_archive_members_under_the_prefix(s3_settings: Settings, tmp_path: Path) -> None:
    client = s3_client(s3_settings)
    bucket = "user-images"
    client.create_bucket(Bucket=bucket)
    a, b, inner = png(shade=1), png(shade=2), png(shade=3)
    client.put_object(Bucket=bucket, Key="set/a.png", Body=a)
    client.put_object(Bucket=bucket, Key="set/sub/b.JPG", Body=b)  # by suffix; decoding is prepare's
    client.put_object(Bucket=bucket, Key="set/huge.csv", Body=b"0" * 5000)  # not counted, never read
    client.put_object(Bucket=bucket, Key="set/notes.txt", Body=b"hello")
    client.put_object(Bucket=bucket, Key="set/more.zip", Body=zip_of({"x/inner.png": inner}))
    client.put_object(Bucket=bucket, Key="set/folder/", Body=b"")  # a console's folder marker
    client.put_object(Bucket=bucket, Key="other/c.png", Body=png())  # outside the prefix
    limited = s3_settings.model_copy(update={"max_dataset_bytes": 4000})  # the images fit, the CSV would not
    found = collect(source_members(f"s3://{bucket}/set/", None, limited, tmp_path / "scratch"))
    assert found == {
        "set/a.png": a,
        "set/sub/b.JPG": b,
        "set/notes.txt": "not an image file",
        "set/huge.csv": "not an image file",
        "set/more.zip/x/inner.png": inner,
    }
    assert list((tmp_path / "scratch").iterdir()) == []  # the downloaded archive is gone after reading


def test_s3_source_lists_every_page(s3_settings: Settings, tmp_path: Path) -> None:
    client = s3_client(s3_settings)
    client.create_bucket(Bucket="many")
    for i in range(1005):  # list_objects_v2 returns 1000 keys a page
        client.put_object(Bucket="many", Key=f"p/{i:04d}.png", Body=b"x")
    names = [m.name for m in source_members("s3://many/p/", None, s3_settings, tmp_path)]
    assert len(names) == 1005 and names[-1] == "p/1004.png"


def test_s3_source_failures_say_why(s3_settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(PreparationFailed, match=r"cannot list s3://no-such-bucket/x/: S3 refused \(NoSuchBucket"):
        list(source_members("s3://no-such-bucket/x/", None, s3_settings, tmp_path))
    # The service's own bucket and prefix (every user's files) cannot be read as a source.
    own = f"s3://{s3_settings.s3_bucket}"
    for source in (f"{own}/", f"{own}/ckpt/", f"{own}/ckpt/datasets/"):
        with pytest.raises(PreparationFailed, match="where this service keeps its own files"):
            list(source_members(source, None, s3_settings, tmp_path))
    s3_client(s3_settings).put_object(Bucket=s3_settings.s3_bucket, Key="user-area/a.png", Body=b"x")
    assert [m.name for m in source_members(f"{own}/user-area/", None, s3_settings, tmp_path)] == ["user-area/a.png"]
    s3_client(s3_settings).create_bucket(Bucket="empty")
    with pytest.raises(PreparationFailed, match="no object under s3://empty/x/"):
        list(source_members("s3://empty/x/", None, s3_settings, tmp_path))
    s3_client(s3_settings).put_object(Bucket="empty", Key="x/big.png", Body=b"0" * 2000)
    small = s3_settings.model_copy(update={"max_dataset_bytes": 1000})
    with pytest.raises(PreparationFailed, match="take 2000 bytes, over the limit of 1000 bytes"):
        list(source_members("s3://empty/x/", None, small, tmp_path))


# --- https:// --------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, Callable[[_Handler], None]]] = {}
    seen: ClassVar[list[dict[str, str]]] = []  # each request's path and Host header

    def do_GET(self) -> None:
        self.seen.append({"path": self.path, "host": self.headers.get("Host", "")})
        self.routes.get(self.path, lambda h: h.send_error(404))(self)

    def log_message(self, *args: object) -> None:
        pass


def body(data: bytes, *, length: bool = True) -> Callable[[_Handler], None]:
    def send(h: _Handler) -> None:
        h.send_response(200)
        if length:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return send


def redirect(location: str) -> Callable[[_Handler], None]:
    def send(h: _Handler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return send


@contextmanager
def serving(
    routes: dict[str, Callable[[_Handler], None]], tls: ssl.SSLContext | None = None
) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """An HTTP(S) server on 127.0.0.1 in a thread; yields its port and the requests it got."""
    handler = type("Handler", (_Handler,), {"routes": routes, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler.seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def allow_private(service_settings: Settings) -> Settings:
    return service_settings.model_copy(update={"dataset_url_allow_private": True})


def test_url_source_downloads_a_zip_and_yields_its_members(allow_private: Settings, tmp_path: Path) -> None:
    image = png()
    archive = zip_of({"imgs/one.png": image, "imgs/readme.txt": b"text"})
    with serving({"/set.zip": body(archive), "/moved": redirect("/set.zip")}) as (port, _):
        found = collect(source_members(f"http://127.0.0.1:{port}/moved", None, allow_private, tmp_path))
    assert found["imgs/one.png"] == image
    assert set(found) == {"imgs/one.png", "imgs/readme.txt"}  # the note: a member or a skip, prepare's call
    assert (tmp_path / "download").read_bytes() == archive


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
def test_url_source_over_the_size_limit_is_refused_while_reading(
    allow_private: Settings, tmp_path: Path, length: bool
) -> None:
    small = allow_private.model_copy(update={"max_dataset_bytes": 1000})
    big = body(b"0" * 300_000, length=length)
    refused = pytest.raises(PreparationFailed, match="larger than the limit of 1000 bytes")
    with serving({"/big.zip": big}) as (port, _), refused:
        download(f"http://127.0.0.1:{port}/big.zip", small, tmp_path / "download")
    assert not (tmp_path / "download").exists()  # no partial file left behind


def test_a_download_that_takes_too_long_is_stopped(
    allow_private: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "DOWNLOAD_DEADLINE_S", 0.0)
    refused = pytest.raises(PreparationFailed, match="took over 0 s; stopped")
    with serving({"/slow.zip": body(b"0" * 1000)}) as (port, _), refused:
        download(f"http://127.0.0.1:{port}/slow.zip", allow_private, tmp_path / "download")
    assert not (tmp_path / "download").exists()


def test_url_source_error_status_and_too_many_redirects(allow_private: Settings, tmp_path: Path) -> None:
    with serving({"/loop": redirect("/loop")}) as (port, _):
        with pytest.raises(PreparationFailed, match="answered 404"):
            download(f"http://127.0.0.1:{port}/missing.zip", allow_private, tmp_path / "d")
        with pytest.raises(PreparationFailed, match="redirects more than 5 times"):
            download(f"http://127.0.0.1:{port}/loop", allow_private, tmp_path / "d")


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the test resolves itself (`*.test`); every other name goes to the real resolver."""
    names: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host in names:
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in names[host]
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/x.zip",
        "https://localhost/x.zip",
        "https://10.1.2.3/x.zip",
        "https://192.168.0.7/x.zip",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/x.zip",
        "https://[::ffff:127.0.0.1]/x.zip",
        "https://0.0.0.0/x.zip",
        "https://loopback.test/x.zip",
        "https://mixed.test/x.zip",
    ],
)
def test_private_addresses_are_refused(
    service_settings: Settings, tmp_path: Path, fake_dns: dict[str, list[str]], url: str
) -> None:
    fake_dns["loopback.test"] = ["127.0.0.1"]
    fake_dns["mixed.test"] = ["93.184.215.14", "10.0.0.5"]  # one private address is enough to refuse
    assert not service_settings.dataset_url_allow_private
    refusal = r"refusing to fetch from .*(loopback|link-local|private|unspecified) address"
    with pytest.raises(PreparationFailed, match=refusal):
        list(source_members(url, None, service_settings, tmp_path))


def test_plain_http_and_credentials_in_urls_are_refused(service_settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(PreparationFailed, match="only https:// sources"):
        download("http://example.com/x.zip", service_settings, tmp_path / "d")
    with pytest.raises(PreparationFailed, match="user name or password"):
        download("https://user:pw@example.com/x.zip", service_settings, tmp_path / "d")


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", False),
        ("2606:4700::1", False),
        ("100.64.0.1", True),  # carrier-grade NAT
        ("224.0.0.1", True),  # multicast
        ("fe80::1%2", True),
        ("fd00::1", True),
        ("2002:7f00:1::", True),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", True),  # NAT64 of 10.0.0.1
        ("::", True),
    ],
)
def test_refused_address(address: str, refused: bool) -> None:
    assert (refused_address(address) is not None) == refused


# A "public" host served from loopback: the test's DNS says public.test is 127.0.0.1, and
# loopback counts as public for these tests only; every other private range is still refused.
def _only_loopback_is_public(address: str) -> str | None:
    return None if ipaddress.ip_address(address).is_loopback else refused_address(address)


def certificate(name: str, tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts: a self-signed certificate for `name`, trusted by the client."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cafile=str(cert_file))


def test_https_connects_to_the_checked_address_with_the_original_name(
    service_settings: Settings, tmp_path: Path, fake_dns: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(net, "refused_address", _only_loopback_is_public)
    fake_dns["public.test"] = ["127.0.0.1"]
    server_tls, client_tls = certificate("public.test", tmp_path)
    names: list[str | None] = []
    server_tls.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,misc]
    archive = zip_of({"a.png": png()})
    with serving({"/set.zip": body(archive), "/moved": redirect("/set.zip")}, tls=server_tls) as (port, seen):
        url = f"https://public.test:{port}/moved"
        assert download(url, service_settings, tmp_path / "d", verify=client_tls).read_bytes() == archive
        fake_dns["public.test"] = ["10.9.9.9"]  # DNS rebinding: the next lookup answers a private address
        with pytest.raises(PreparationFailed, match=r"private address 10.9.9.9"):
            download(url, service_settings, tmp_path / "d", verify=client_tls)
    assert names == ["public.test", "public.test"]  # TLS names the host, not the address connected to
    assert seen == [{"path": p, "host": f"public.test:{port}"} for p in ("/moved", "/set.zip")]

    fake_dns["public.test"] = ["127.0.0.1"]
    other_tls, _ = certificate("other.test", tmp_path)
    refused = pytest.raises(PreparationFailed, match=r"cannot fetch .*CERTIFICATE_VERIFY_FAILED")
    with serving({"/set.zip": body(archive)}, tls=other_tls) as (port, _), refused:  # a certificate for another name
        download(f"https://public.test:{port}/set.zip", service_settings, tmp_path / "d", verify=client_tls)


def test_a_redirect_to_a_private_address_is_refused(
    service_settings: Settings, tmp_path: Path, fake_dns: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(net, "refused_address", _only_loopback_is_public)
    fake_dns["public.test"] = ["127.0.0.1"]
    fake_dns["internal.test"] = ["192.168.1.20"]
    server_tls, client_tls = certificate("public.test", tmp_path)
    routes = {
        "/to-metadata": redirect("https://169.254.169.254/latest/meta-data"),
        "/to-internal": redirect("https://internal.test/x.zip"),
        "/to-http": redirect("http://public.test/x.zip"),
    }
    with serving(routes, tls=server_tls) as (port, _):
        base = f"https://public.test:{port}"
        with pytest.raises(PreparationFailed, match=r"link-local address 169.254.169.254"):
            download(f"{base}/to-metadata", service_settings, tmp_path / "d", verify=client_tls)
        with pytest.raises(PreparationFailed, match=r"internal.test: it resolves to a private address 192.168.1.20"):
            download(f"{base}/to-internal", service_settings, tmp_path / "d", verify=client_tls)
        with pytest.raises(PreparationFailed, match="refusing http://"):
            download(f"{base}/to-http", service_settings, tmp_path / "d", verify=client_tls)


# --- hf:// -----------------------------------------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local stand-in for the Hub (DDPM_HF_DATASETS_DIR), with the library kept offline."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    return tmp_path / "hub"


def write_hf_dataset(folder: Path, columns: dict[str, list], features) -> None:  # type: ignore[no-untyped-def]
    import datasets

    (folder / "data").mkdir(parents=True)
    table = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    table.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))


def test_hf_source_reads_the_image_column_as_original_bytes(
    service_settings: Settings, hf_dir: Path, tmp_path: Path
) -> None:
    import datasets

    images = [png(shade=i) for i in range(3)]
    rows = [{"bytes": data, "path": None} for data in images] + [
        {"bytes": None, "path": "/etc/passwd"},  # a row naming a file of the worker's host
        None,
    ]
    write_hf_dataset(
        hf_dir / "someone" / "shapes",
        {"label": [0, 1, 2, 3, 4], "picture": rows},
        {"label": datasets.Value("int64"), "picture": datasets.Image()},
    )
    settings = service_settings.model_copy(update={"hf_datasets_dir": hf_dir})
    found = collect(source_members("hf://someone/shapes", "train", settings, tmp_path / "scratch"))
    assert found == {
        "train/0": images[0],
        "train/1": images[1],
        "train/2": images[2],
        "train/3": "its image is a file outside the data set",
        "train/4": "no image in this row",
    }
    with pytest.raises(PreparationFailed, match=r"cannot load hf://someone/shapes \(split 'test'\).*Unknown split"):
        list(source_members("hf://someone/shapes", "test", settings, tmp_path / "scratch"))
    with pytest.raises(PreparationFailed, match="no data set nobody/here in DDPM_HF_DATASETS_DIR"):
        list(source_members("hf://nobody/here", "train", settings, tmp_path / "scratch"))
    with pytest.raises(PreparationFailed, match="is not hf://namespace/name"):
        list(source_members("hf://../etc", "train", settings, tmp_path / "scratch"))


def test_hf_source_over_the_size_limit_is_refused(service_settings: Settings, hf_dir: Path, tmp_path: Path) -> None:
    import datasets

    images = [{"bytes": png(shade=i), "path": None} for i in range(3)]
    folder = hf_dir / "someone" / "shapes"
    write_hf_dataset(folder, {"picture": images}, {"picture": datasets.Image()})
    one = len(images[0]["bytes"])
    settings = service_settings.model_copy(update={"hf_datasets_dir": hf_dir, "max_dataset_bytes": 2 * one + 10})
    with pytest.raises(PreparationFailed, match="holds more than the limit of"):
        list(source_members("hf://someone/shapes", "train", settings, tmp_path))
    # A data set card that declares its download size is refused before anything is fetched.
    (folder / "README.md").write_text("---\ndataset_info:\n  download_size: 9999999\n---\n")
    settings = settings.model_copy(update={"max_dataset_bytes": 10_000})
    with pytest.raises(PreparationFailed, match="declares 9999999 bytes to download, over the limit of 10000"):
        list(source_members("hf://someone/shapes", "train", settings, tmp_path))


def test_hf_source_without_an_image_column_names_its_columns(
    service_settings: Settings, hf_dir: Path, tmp_path: Path
) -> None:
    import datasets

    write_hf_dataset(
        hf_dir / "someone" / "text",
        {"text": ["a", "b"], "label": [0, 1]},
        {"text": datasets.Value("string"), "label": datasets.Value("int64")},
    )
    settings = service_settings.model_copy(update={"hf_datasets_dir": hf_dir})
    with pytest.raises(PreparationFailed, match=r"no image column .*its columns: text \(Value\('string'\)\), label"):
        list(source_members("hf://someone/text", "train", settings, tmp_path))


def test_hf_source_from_the_hub_is_offline_here(service_settings: Settings, hf_dir: Path, tmp_path: Path) -> None:
    """Without DDPM_HF_DATASETS_DIR the id goes to the Hub; offline, that is a clear failure."""
    with pytest.raises(PreparationFailed, match="cannot load hf://nobody/nothing"):
        list(source_members("hf://nobody/nothing", "train", service_settings, tmp_path))


def test_unknown_scheme_is_refused(service_settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(PreparationFailed, match="unsupported source 'ftp://x/y'"):
        list(source_members("ftp://x/y", None, service_settings, tmp_path))


def test_hf_source_image_files_inside_the_data_set_are_read(
    service_settings: Settings, hf_dir: Path, tmp_path: Path
) -> None:
    """An image column that names files (as an imagefolder's does) is read from the data set's own folder."""
    import datasets

    folder = hf_dir / "someone" / "files"
    (folder / "pics").mkdir(parents=True)
    image = png(shade=9)
    (folder / "pics" / "a.png").write_bytes(image)
    outside = tmp_path / "secret.png"
    outside.write_bytes(png(shade=1))
    rows = [{"bytes": None, "path": str(folder / "pics" / "a.png")}, {"bytes": None, "path": str(outside)}]
    write_hf_dataset(folder, {"picture": rows}, {"picture": datasets.Image()})
    settings = service_settings.model_copy(update={"hf_datasets_dir": hf_dir})
    found = collect(source_members("hf://someone/files", "train", settings, tmp_path / "scratch"))
    assert found == {"train/0": image, "train/1": "its image is a file outside the data set"}
