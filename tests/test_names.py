"""Names read off the wire: DNS answers, TLS SNI and HTTP Host, parsed strictly or not at all."""

import random
import ssl
import struct

import pytest

from picosnitch.identity.names import (
    Malformed,
    parse_dns_payload,
    parse_dns_response,
    parse_http_host,
    parse_tls_sni,
)


def name(text: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in text.split(".")) + b"\0"


def record(owner: bytes, rtype: int, rdata: bytes) -> bytes:
    return owner + struct.pack(">HHIH", rtype, 1, 300, len(rdata)) + rdata


def response(question: str, *answers: bytes, authority: bytes = b"") -> bytes:
    header = struct.pack(">HHHHHH", 0x1234, 0x8180, 1, len(answers), 1 if authority else 0, 0)
    return header + name(question) + struct.pack(">HH", 1, 1) + b"".join(answers) + authority


def test_a_and_aaaa_answers_are_named_for_the_question():
    msg = response("www.example.org", record(b"\xc0\x0c", 1, bytes([93, 184, 216, 34])),
                   record(b"\xc0\x0c", 28, bytes(15) + b"\x01"))
    answer = parse_dns_response(msg)
    assert answer.question == "www.example.org"
    assert answer.addresses == {"93.184.216.34": "www.example.org", "::1": "www.example.org"}


def test_addresses_at_the_end_of_a_cname_chain_get_the_name_asked_for():
    msg = response("Shop.Example.ORG",
                   record(b"\xc0\x0c", 5, name("shop.cdn.example.net")),
                   record(name("shop.cdn.example.net"), 5, name("edge.example.net")),
                   record(name("edge.example.net"), 1, bytes([10, 1, 2, 3])))
    assert parse_dns_response(msg).addresses == {"10.1.2.3": "shop.example.org"}


def test_records_of_names_outside_the_chain_and_authority_records_name_nothing():
    msg = response("a.example", record(name("b.example"), 1, bytes([10, 0, 0, 2])),
                   authority=record(b"\xc0\x0c", 1, bytes([10, 0, 0, 3])))
    assert parse_dns_response(msg).addresses == {}


def test_a_tcp_answer_is_read_with_or_without_its_length_prefix():
    msg = response("tcp.example", record(b"\xc0\x0c", 1, bytes([10, 9, 9, 9])))
    for data in (len(msg).to_bytes(2, "big") + msg, msg):
        assert parse_dns_payload(data, tcp=True).addresses == {"10.9.9.9": "tcp.example"}


@pytest.mark.parametrize("broken", [
    b"",
    response("q.example")[:-1],  # truncated question
    response("q.example", record(b"\xc0\x0c", 1, bytes([1, 2, 3, 4])))[:-2],  # truncated record
    response("q.example", record(b"\xc0\x0c", 1, bytes([1, 2, 3, 4]))) + b"x",  # trailing bytes
    response("q.example", record(b"\xc0\x40", 1, bytes([1, 2, 3, 4]))),  # a pointer forward
    struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + name("q.example") + b"\0\1\0\1",  # a query, not a response
    response("10.0.0.1", record(b"\xc0\x0c", 1, bytes([10, 0, 0, 1]))),  # an address asked for, not a name
])
def test_anything_but_a_whole_response_gives_no_names(broken):
    with pytest.raises(Malformed):
        parse_dns_response(broken)


def test_a_compression_loop_is_refused():
    header = struct.pack(">HHHHHH", 1, 0x8180, 1, 0, 0, 0)
    with pytest.raises(Malformed):
        parse_dns_response(header + b"\x01a\xc0\x0c" + b"\0\1\0\1")


def test_random_bytes_and_every_prefix_of_an_answer_give_no_names():
    rng = random.Random(20261207)
    msg = response("www.example.org", record(b"\xc0\x0c", 1, bytes([93, 184, 216, 34])))
    samples = [msg[:n] for n in range(len(msg))] + [bytes(rng.getrandbits(8) for _ in range(rng.randrange(200)))
                                                    for _ in range(2000)]
    for sample in samples:
        with pytest.raises(Malformed):
            parse_dns_response(sample)


def client_hello(server_name: str) -> bytes:
    """The first bytes Python's TLS client sends, made without a network."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_server_name_of_a_real_client_hello_is_read():
    assert parse_tls_sni(client_hello("Mail.Example.com")) == "mail.example.com"


def test_a_client_hello_cut_before_its_server_name_gives_none():
    hello = client_hello("mail.example.com")
    cut = hello.index(b"mail.example.com")
    for size in (10, 60, cut - 4, cut + 5):
        with pytest.raises(Malformed):
            parse_tls_sni(hello[:size])


def test_a_client_hello_without_a_server_name_gives_none():
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with pytest.raises(ssl.SSLWantReadError):
        context.wrap_bio(incoming, outgoing).do_handshake()  # no server_hostname: no SNI
    with pytest.raises(Malformed):
        parse_tls_sni(outgoing.read())


@pytest.mark.parametrize("request_bytes,host", [
    (b"GET / HTTP/1.1\r\nHost: www.example.org\r\nAccept: */*\r\n\r\n", "www.example.org"),
    (b"POST /x HTTP/1.1\r\nuser-agent: t\r\nHOST:  api.example.org:8080 \r\n\r\n", "api.example.org"),
])
def test_the_host_header_of_an_http_request_is_read(request_bytes, host):
    assert parse_http_host(request_bytes) == host


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\nHost: body.example\r\n",  # only in the body
    b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n",  # an address
    b"GET / HTTP/1.1\r\nHost: [fd00::1]:80\r\n\r\n",
    b"hello Host: x.example\r\n",
])
def test_a_request_without_a_host_name_gives_none(request_bytes):
    with pytest.raises(Malformed):
        parse_http_host(request_bytes)
