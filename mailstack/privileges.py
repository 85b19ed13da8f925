# -*- test-case-name: tests.test_privileges -*-
"""
Who owns the data directory, and running as root then as that user.

C{twistd --uid U --gid G mailstack} binds its ports as root, then becomes
U:G and starts the service.  Everything the service touches after the
drop must belong to U, so before the drop (L{mailstack.tap.makeService},
still root) L{prepare} creates the data directory's layout and hands it
to U:G, including files root made earlier (C{mailstack user add} run
before the first start, the generated TLS key).  After the drop,
L{check} looks at what the service needs and refuses to start, naming the
path, when it cannot use it: a server that starts and answers C{451}
forever is worse than one that does not start.

The C{mailstack} command, run by root on a data directory owned by another
user, becomes that user (L{become_owner}) before it writes anything, so
the files it makes belong to the server.

The layout (the data directory is 0711 so that any local user can reach
C{maildrop/}, and nothing else)::

    DATA/            0711  owner
    DATA/maildrop/   1733  owner  (sendmail's drop box, see mailstack.mua.sendmail)
    DATA/mail/, queue/, tmp/, tls/   0700 owner
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable

DATA_MODE = 0o711
MAILDROP_MODE = 0o1733
PRIVATE_DIRS = ("mail", "queue", "queue/tmp", "queue/msg", "tmp", "tls")
MAILDROP = "maildrop"


class StartupError(Exception):
    """
    The service cannot use a path it needs; the message names it.
    """


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def describe(path: str) -> str:
    """
    C{path}'s owner and mode, for error messages.
    """
    try:
        st = os.lstat(path)
    except OSError as e:
        return e.strerror or str(e)
    return f"owner {user_name(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}"


def _mkdir(path: str, mode: int) -> bool:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return False
    os.chmod(path, mode)  # whatever the umask took away
    return True


def ensure_layout(data_dir: str) -> None:
    """
    Create the data directory and its fixed directories if missing, and
    set the modes of the data directory and the maildrop (when this process
    owns them: only their owner, or root, may change them).
    """
    data = os.path.abspath(data_dir)
    os.makedirs(os.path.dirname(data), exist_ok=True)
    _mkdir(data, DATA_MODE)
    for name in PRIVATE_DIRS:
        _mkdir(os.path.join(data, name), 0o700)
    _mkdir(os.path.join(data, MAILDROP), MAILDROP_MODE)
    for path, mode in ((data, DATA_MODE), (os.path.join(data, MAILDROP), MAILDROP_MODE)):
        st = os.stat(path)
        if stat.S_IMODE(st.st_mode) != mode and (st.st_uid == os.geteuid() or os.geteuid() == 0):
            os.chmod(path, mode)


def _owned_paths(data: str) -> Iterable[str]:
    """
    What L{prepare} hands to the service user: the whole data directory
    except the inside of the Maildirs (which only the server writes), and
    the maildrop's files (which belong to whoever submitted them).
    """
    yield data
    for entry in os.scandir(data):
        path = entry.path
        yield path
        if entry.name == "mail" and entry.is_dir(follow_symlinks=False):
            for domain in os.scandir(path):
                yield domain.path
                if domain.is_dir(follow_symlinks=False):
                    for user in os.scandir(domain.path):
                        yield user.path
        elif entry.name != MAILDROP and entry.is_dir(follow_symlinks=False):
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    yield os.path.join(root, name)


def prepare(data_dir: str, uid: int | None = None, gid: int | None = None) -> list[str]:
    """
    As root before dropping privileges: create the layout and give it to
    C{uid}:C{gid}.  Returns the paths whose owner changed.
    """
    ensure_layout(data_dir)
    data = os.path.abspath(data_dir)
    changed: list[str] = []
    if uid is None or os.geteuid() != 0:
        return changed
    gid = pwd.getpwuid(uid).pw_gid if gid is None else gid
    for path in _owned_paths(data):
        st = os.lstat(path)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.lchown(path, uid, gid)
            changed.append(path)
    return changed


def check(data_dir: str, readable: Iterable[str] = ()) -> None:
    """
    After the drop: raise L{StartupError} naming the first path of the
    layout (or of C{readable}, e.g. TLS files) that this process cannot use.
    """
    data = os.path.abspath(data_dir)
    who = f"uid {os.geteuid()} ({user_name(os.geteuid())})"
    hint = ("start the server as root with twistd --uid/--gid (it prepares the data "
            f"directory), or give it to this user: chown -R {user_name(os.geteuid())} {data}")
    dirs = [data] + [os.path.join(data, name) for name in PRIVATE_DIRS + (MAILDROP,)]
    for path in dirs:
        if not os.path.isdir(path):
            raise StartupError(f"{path}: not a directory ({describe(path)}); {hint}")
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            raise StartupError(f"{path}: not usable by {who} ({describe(path)}); {hint}")
    optional = [os.path.join(data, name) for name in ("users", "aliases")]
    for path in optional + list(readable):
        try:
            open(path, "rb").close()
        except FileNotFoundError:
            if path not in optional:
                raise StartupError(f"{path}: does not exist") from None
        except OSError as e:
            raise StartupError(f"{path}: not readable by {who} ({e.strerror}; "
                               f"{describe(path)}); {hint}") from None
    for name in ("users.lock", "aliases.lock"):
        path = os.path.join(data, name)
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise StartupError(f"{path}: not writable by {who} ({describe(path)}); {hint}")


def target_ids(user: int | str | None, group: int | str | None) -> tuple[int, int] | None:
    """
    twistd's C{--uid}/C{--gid} values (numbers or names) as numbers.
    """
    if user is None and group is None:
        return None
    if user is None:
        uid = os.getuid()
    elif isinstance(user, int) or str(user).isdigit():
        uid = int(user)
    else:
        uid = pwd.getpwnam(str(user)).pw_uid
    if group is None:
        gid = pwd.getpwuid(uid).pw_gid
    elif isinstance(group, int) or str(group).isdigit():
        gid = int(group)
    else:
        gid = grp.getgrnam(str(group)).gr_gid
    return uid, gid


def become_owner(data_dir: str) -> tuple[int, int] | None:
    """
    Run as root on a data directory owned by another user: become that
    user (and its group) for good, so every file this process writes is
    the server's.  Returns the new ids, or C{None} when nothing changed.
    """
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(data_dir)
    except FileNotFoundError:
        return None
    if st.st_uid == 0:
        return None
    os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)
    return st.st_uid, st.st_gid
