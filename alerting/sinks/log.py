"""The log sink: one JSON line per notification through ``logging``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from alerting.alert import Notification
from alerting.ratelimit import Throttle
from alerting.render import log_record

__all__ = ["LogSink"]


class LogSink:
    """Writes one structured line per notification: firing at ``firing_level``, resolved at
    ``resolved_level``. The message is the JSON record; the same dict rides along as
    ``record.alert_notification`` for JSON formatters that want it unserialised.
    """

    max_batch = 64

    def __init__(
        self,
        *,
        name: str = "log",
        logger: logging.Logger | str = "muai.alerts",
        firing_level: int = logging.WARNING,
        resolved_level: int = logging.INFO,
        max_alerts: int = 50,
    ) -> None:
        self.name = name
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.firing_level = firing_level
        self.resolved_level = resolved_level
        self.max_alerts = max_alerts

    def default_policy(self) -> Throttle:
        """Grouped and rate limited, like any receiver a person reads."""
        return Throttle()

    async def send(self, notifications: Sequence[Notification]) -> None:
        for note in notifications:
            record = log_record(note, max_alerts=self.max_alerts)
            level = self.firing_level if note.status == "firing" else self.resolved_level
            self.logger.log(
                level,
                json.dumps(record, separators=(",", ":"), ensure_ascii=False),
                extra={"alert_notification": record},
            )
