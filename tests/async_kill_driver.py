"""pma-train that dies (os._exit: no cleanup, as under SIGKILL) on every rank right after its
PMA_TEST_DIE_AT_SAVE-th checkpoint save was started in the background, while it is in flight."""

from __future__ import annotations

import os

from pma_train.checkpoint import async_save
from pma_train.cli import train


def main() -> None:
    die_at, started = int(os.environ["PMA_TEST_DIE_AT_SAVE"]), [0]
    start = async_save.start

    def start_then_die(request, publish) -> None:
        start(request, publish)
        started[0] += 1
        if started[0] == die_at:
            os._exit(9)

    async_save.start = start_then_die
    train.main()


if __name__ == "__main__":
    main()
