"""SR-IOV VF association and data-path switching between NetVSP and NetVSC (reference
vmbus_netvsp.md h.1-h.2): the host associates a VF once the guest can team with
one, the guest switches the data path and the host's backend moves first, removal
brings the data path back to synthetic before the association goes, and a guest
that asks for a VF it was not given stays synthetic."""
from __future__ import annotations

import pytest

from netvsp import nvsp as N
from netvsp.netvsc import Netvsc, NetvscError

from .test_review_synthetic_port import start, wait


@pytest.fixture
def pair():
    host, ram, client, pages = start()
    nic = Netvsc(ram, client, pages, timeout=30)
    nic.bring_up()
    moves = []

    def backend(channel, path):
        moves.append(path)
        return host.refuse is False
    host.refuse = False
    host.dev.on_data_path = backend
    try:
        yield host, nic, moves
    finally:
        host.close()
        assert not host.errors, host.errors
        ram.close()


def _guest_sees(nic, pred, what):
    wait(lambda: (nic.poll(0.01), pred())[1], what)


def test_association_switch_and_removal_in_the_references_order(pair):
    host, nic, moves = pair
    assert nic.version >= N.VERSION_4
    with host.lock:
        assert host.dev.offer_vf(17)
    _guest_sees(nic, lambda: nic.vf_alloc, "the VF association")
    assert nic.vf_serial == 17 and nic.vf_events == [(True, 17)]
    nic.switch_data_path(N.DATAPATH_VF)                      # completed: host moved first
    assert moves == [N.DATAPATH_VF] and host.dev.datapath == N.DATAPATH_VF
    with host.lock:
        host.dev.withdraw_vf()
    _guest_sees(nic, lambda: not nic.vf_alloc, "the association withdrawn")
    assert moves == [N.DATAPATH_VF, N.DATAPATH_SYNTHETIC]
    assert nic.datapath == N.DATAPATH_SYNTHETIC and host.dev.datapath == N.DATAPATH_SYNTHETIC
    assert nic.vf_events == [(True, 17), (False, 17)]


def test_a_vf_not_associated_cannot_take_the_data_path(pair):
    host, nic, moves = pair
    with pytest.raises(NetvscError, match="no VF is associated"):
        nic.switch_data_path(N.DATAPATH_VF)
    # A guest that asks anyway (its own message) is completed and stays synthetic.
    tid = nic._send(N.nvsp_switch_data_path(N.DATAPATH_VF))
    nic._completion(tid, "SWITCH_DATA_PATH")
    assert moves == [] and host.dev.datapath == N.DATAPATH_SYNTHETIC
    info = host.syn.port_info(host.vm_port.port_id)
    assert "SWITCH_DATA_PATH to a VF that is not associated" in str(info)


def test_a_backend_that_cannot_move_leaves_it_synthetic(pair):
    host, nic, moves = pair
    host.refuse = True
    with host.lock:
        host.dev.offer_vf(3)
    _guest_sees(nic, lambda: nic.vf_alloc, "the VF association")
    nic.switch_data_path(N.DATAPATH_VF)
    assert moves == [N.DATAPATH_VF] and host.dev.datapath == N.DATAPATH_SYNTHETIC


def test_a_guest_completing_the_association_is_not_a_violation(pair):
    host, nic, moves = pair
    with host.lock:
        host.dev.offer_vf(5)
    _guest_sees(nic, lambda: nic.vf_alloc, "the VF association")
    from netvsp.vmbus import packet as P
    ok, sig = nic.out.write_packet(P.VM_PKT_COMP, b"", N.VF_ASSOCIATION_TRANS_ID)
    nic._kick(sig)
    nic.switch_data_path(N.DATAPATH_VF)                       # the channel still works
    assert host.dev.datapath == N.DATAPATH_VF
    with host.lock:
        assert all(not nc.closed for nc in host.dev.channels.values())


def test_no_association_for_a_guest_that_cannot_team(monkeypatch):
    """No sriov capability in the guest's NDIS config: offer_vf says no."""
    host, ram, client, pages = start()
    try:
        nic = Netvsc(ram, client, pages, timeout=30)
        orig = N.linux_ndis_config_capabilities
        monkeypatch.setattr(N, "linux_ndis_config_capabilities",
                            lambda v: orig(v) & ~N.CAP_SRIOV)
        nic.bring_up()
        with host.lock:
            assert host.dev.offer_vf(9) is False
        nic.poll(0.05)
        assert not nic.vf_alloc and nic.vf_events == []
    finally:
        host.close()
        ram.close()
