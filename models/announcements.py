"""What the control plane has told people about the relay's own actions (issue 12 §6).

`Announcement` is one Slack message per subject and window (an (IP, provider) path and an hour,
say) that is updated as more reactions on that subject arrive, instead of one message each.
`ControlCursor` keeps how far a scheduled reader has read an append-only table (the audit
trail), so each entry is announced once and an idle run is one indexed query.
"""

from datetime import datetime

from sqlalchemy import DateTime
from sqlmodel import Field, SQLModel

from models.base import created_at_field, json_field


class Announcement(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    subject: str = Field(max_length=255, index=True)  # path:<ip>/<provider>
    window_start: datetime = Field(index=True, sa_type=DateTime(timezone=True))
    reactions: int = 0
    entries: list = json_field()  # the audit entry ids it announces
    summary: dict = json_field()  # what the message shows (actions, rules, until)
    slack_channel: str | None = Field(default=None, max_length=32)
    slack_ts: str | None = Field(default=None, max_length=32)
    created_at: datetime = created_at_field()
    updated_at: datetime = created_at_field()


class ControlCursor(SQLModel, table=True):
    __tablename__ = "control_cursor"

    name: str = Field(primary_key=True, max_length=64)
    position: int = 0  # the last id read
    updated_at: datetime = created_at_field()
