"""Switch.run, the data-path loop: it sleeps in epoll on the port kinds'
descriptors and must wake for every one of them."""
from __future__ import annotations

import os
import threading
import time

from switch.portkind import PortKind
from switch.switch import Switch

MAC = "02:00:00:00:0a:01"


def test_the_data_path_loop_watches_a_descriptor_number_that_was_reused():
    """A kind's descriptor closed and another opened under the same number between
    two idle passes (a VM's channel reopened, a port replaced) is a new file that
    epoll does not watch: the loop must register it, or the port is polled only
    when the idle wait times out."""
    class _Doorbells(PortKind):
        def __init__(self):
            super().__init__()
            self.fd = os.eventfd(0, os.EFD_NONBLOCK)       # the one whose number is reused
            self.kick = os.eventfd(0, os.EFD_NONBLOCK)     # another port's
            self.rung = threading.Event()

        def fds(self):
            return [self.fd, self.kick]

        def receive(self, batch):
            for fd in (self.fd, self.kick):
                try:
                    os.eventfd_read(fd)
                    if fd == self.fd:
                        self.rung.set()
                except BlockingIOError:
                    pass
            return 0
    sw = Switch("rvreuse", max_ports=4)
    k = sw.add_kind(_Doorbells())
    sw.add_port("p", "synthetic", mac=MAC, kind=k)
    stop = threading.Event()
    t = threading.Thread(target=sw.run, args=(stop,), kwargs={"idle_wait_s": 60.0})
    t.start()
    try:
        time.sleep(0.3)                        # the loop sleeps in epoll on both
        new = os.eventfd(0, os.EFD_NONBLOCK)
        os.dup2(new, k.fd)                     # the old file closes, the number stays
        os.close(new)
        os.eventfd_write(k.kick, 1)            # one pass, and back to sleep
        time.sleep(0.3)
        os.eventfd_write(k.fd, 1)
        assert k.rung.wait(10), "the reused descriptor number was never watched"
    finally:
        stop.set()
        for _ in range(100):                   # a kick read in the same pass as the
            os.eventfd_write(k.kick, 1)        # stop's would leave the loop asleep
            t.join(0.1)
            if not t.is_alive():
                break
        os.close(k.fd)
        os.close(k.kick)
    assert not t.is_alive()
