"""The doctor's permission reading: owner, group and other bits, judged for a user other than us."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from procurator import doctor

USER = "nobody"


def test_user_may_follows_owner_group_and_other_bits(tmp_path: Path) -> None:
    entry = pwd.getpwnam(USER)
    device = tmp_path / "device"
    device.write_text("")
    rw = os.R_OK | os.W_OK
    cases = [  # (uid, gid, mode, may)
        (0, 0, 0o600, False),
        (0, 0, 0o666, True),
        (0, 0, 0o664, False),
        (entry.pw_uid, 0, 0o600, True),
        (entry.pw_uid, 0, 0o066, False),  # the owner's bits decide for the owner, not the others'
        (0, entry.pw_gid, 0o660, True),  # its primary group
        (0, entry.pw_gid, 0o606, False),
    ]
    for uid, gid, mode, may in cases:
        os.chown(device, uid, gid)
        device.chmod(mode)
        assert doctor._user_may(device, USER, rw) is may, (uid, gid, oct(mode))
    device.chmod(0o644)
    os.chown(device, 0, 0)
    assert doctor._user_may(device, USER, os.R_OK) is True
    assert doctor._user_may(device, None, rw) is True  # ourselves: root


def test_report_json_is_versioned_and_fails_on_any_failure() -> None:
    ok = doctor.Check("state", doctor.Status.OK, "fine")
    warn = doctor.Check("network", doctor.Status.WARN, "odd", "run it")
    fail = doctor.Check("kvm", doctor.Status.FAIL, "no", "enable it", seconds=0.0004)
    assert doctor.Report("qemu", (ok, warn)).ok is True
    report = doctor.Report("qemu", (ok, fail))
    assert report.to_json() == {
        "schema": 1,
        "backend": "qemu",
        "ok": False,
        "checks": [
            {"name": "state", "status": "ok", "detail": "fine", "fix": None, "seconds": 0.0},
            {"name": "kvm", "status": "fail", "detail": "no", "fix": "enable it", "seconds": 0.0},
        ],
    }
