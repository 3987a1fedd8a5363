"""A child layer's reports are checked data: forged namespace fds are refused."""

import os

from bbld.engine import reports
from bbld.engine.instance import _namespace_fds_match


def test_namespace_fds_must_be_the_namespaces_the_report_names(tmp_path):
    pidfd = os.pidfd_open(os.getpid())
    net = os.open("/proc/self/ns/net", os.O_RDONLY)
    plain = os.open(tmp_path, os.O_RDONLY)
    inode = os.fstat(net).st_ino
    try:
        def built(names, inodes):
            return reports.Built(layer="x", namespaces=inodes, namespace_fds=names)

        assert _namespace_fds_match(built(["net"], {"net": inode}), [pidfd, net])
        assert not _namespace_fds_match(built(["net"], {"net": inode + 1}), [pidfd, net])
        assert not _namespace_fds_match(built(["net"], {"net": os.fstat(plain).st_ino}),
                                        [pidfd, plain])  # not a namespace at all
        assert not _namespace_fds_match(built(["bogus"], {"bogus": inode}), [pidfd, net])
        assert not _namespace_fds_match(built(["net", "net"], {"net": inode}),
                                        [pidfd, net, net])
        assert not _namespace_fds_match(built(["net"], {"net": inode}), [pidfd])
    finally:
        for fd in (pidfd, net, plain):
            os.close(fd)
