"""Raw header surgery that keeps every other byte of the message as the client sent it.

Re-serialising through the email package would refold and re-encode headers the customer
may already have signed or relied on; we only add, remove and read whole fields.
"""

from __future__ import annotations


class MessageHeaders:
    def __init__(self, fields: list[bytes], body: bytes):
        self.fields = fields  # each field with its continuation lines, without the final CRLF
        self.body = body

    @classmethod
    def parse(cls, data: bytes) -> MessageHeaders:
        head, sep, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n") if head else []
        fields: list[bytes] = []
        for index, line in enumerate(lines):
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1] += b"\r\n" + line
            elif b":" in line:
                fields.append(line)
            else:
                # Not a header line: the header block ended without its blank line. Whatever
                # follows is body text; the blank line is added when serialising.
                rest = b"\r\n".join(lines[index:])
                return cls(fields, rest + (sep + body if sep else b"\r\n"))
        return cls(fields, body)

    @staticmethod
    def name_of(field: bytes) -> str:
        return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [
            f.split(b":", 1)[1].decode("utf-8", "surrogateescape").replace("\r\n", "").strip()
            for f in self.fields
            if self.name_of(f) == name
        ]

    def remove(self, name: str) -> None:
        name = name.lower()
        self.fields = [f for f in self.fields if self.name_of(f) != name]

    def append(self, name: str, value: str) -> None:
        self.fields.append(f"{name}: {value}".encode())

    def prepend(self, name: str, value: str) -> None:
        self.fields.insert(0, f"{name}: {value}".encode())

    def to_bytes(self) -> bytes:
        head = b"\r\n".join(self.fields)
        return head + b"\r\n\r\n" + self.body
