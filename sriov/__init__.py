"""SR-IOV: the vfio UAPI, SR-IOV management, the software SR-IOV NIC and its VF driver."""
