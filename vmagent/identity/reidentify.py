"""A warm-started clone's own identity, given through the guest agent.

:data:`PROGRAM` is a perl program the guest agent runs as root right after the
restore (:func:`reidentify_argv`): host entropy and a forced reseed of the kernel's RNG,
the clock, missing users, then the hostname, machine-id, fresh SSH host keys (made on the
host: the guest's RNG is the template's until it reseeds) and this VM's authorized_keys,
each file written atomically. The keys of the template's users are emptied first, so the creator of
a template has no access to clones made for others.
"""

from __future__ import annotations

from vmagent.identity import hostkeys

from vmagent.identity import seed
from vmagent.identity.accounts import Account

# run in the template VM before its state is saved: no key of the template's creator is
# in the saved state or the frozen disk, so not even the moment between a clone's
# restore and its re-identification gives that key access
FORGET_KEYS_SH = ("for f in /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys; do "
                  "if [ -f \"$f\" ]; then : > \"$f\"; fi; done; sync")


def console_key_block(keys: dict[str, tuple[str, str]]) -> bytes:
    """The block cloud-init prints at first boot; vmctl pins the keys it finds there."""
    lines = ["", "-----BEGIN SSH HOST KEY KEYS-----",
             *(" ".join(pub.split()[:2]) + f" root@{kind}" for kind, (_, pub) in
               keys.items()),
             "-----END SSH HOST KEY KEYS-----", ""]
    return ("\r\n".join(lines)).encode()


Entry = tuple  # (content: bytes | None for a directory, mode: int, owner: str)


def reidentify_files(name: str, accounts: list[Account], keys: dict[str, tuple[str, str]],
                     machine_id: str) -> dict[str, Entry]:
    """What a clone gets: {absolute path: (content or None for a directory, mode, owner)},
    in the order they are written. Owners are names, looked up in the guest, so the users
    must exist (the program creates missing ones first)."""
    files: dict[str, Entry] = {
        "/etc/hostname": (f"{name}\n".encode(), 0o644, "root"),
        "/etc/machine-id": (f"{machine_id}\n".encode(), 0o444, "root"),
    }
    for kind, (priv, pub) in keys.items():
        path = f"/etc/ssh/ssh_host_{kind}_key"
        files[path] = (priv.encode(), 0o600, "root")
        files[path + ".pub"] = ((pub.strip() + "\n").encode(), 0o644, "root")
    files[hostkeys.SSHD_CONF] = (hostkeys.sshd_conf(keys).encode(), 0o644, "root")
    for acc in accounts:
        user = acc.name
        files[f"/etc/sudoers.d/90-vmagent-{user}"] = (
            f"{user} {seed.SUDO_RULE}\n".encode(), 0o440, "root")
        files[f"/home/{user}/.ssh"] = (None, 0o700, user)
        files[f"/home/{user}/.ssh/authorized_keys"] = (
            "".join(k + "\n" for k in acc.keys).encode(), 0o600, user)
    return files


# The program the guest agent runs (perl: it is in every Debian and Ubuntu install,
# perl-base being essential, and it does in one process what would otherwise take a
# dozen programs, each translated from scratch by TCG after a restore). Arguments:
# ROOT NAME SEC USEC ENTROPY_HEX GROUPS NEW_USERS (comma-separated), then
# PATH MODE OWNER HEX ("-" for a directory) for every file. ROOT is "/" in a guest; a
# test runs the same program on a directory, where the RNG and the clock are left alone.
PROGRAM = r"""
use strict; use warnings;
$| = 1;
my ($R, $name, $sec, $usec, $entropy, $groups, $new_users, @files) = @ARGV;
my $guest = $R eq "/";
$R = "" if $guest;
sub mark { open(my $u, "<", "/proc/uptime"); my ($up) = split / /, <$u>; print "T $up $_[0]\n"; }
sub spew { my ($path, $data, $mode, $uid, $gid) = @_;
  my $tmp = "$path.vmagent-new";
  open(my $f, ">", $tmp) or die "$path: $!\n"; binmode $f; print $f $data;
  close $f or die "$path: $!\n";
  chown $uid, $gid, $tmp; chmod $mode, $tmp; rename $tmp, $path or die "$path: $!\n"; }
mark("start");
if ($guest) {
  # the RNG (the template's until reseeded; Debian's cloud kernel has no vmgenid driver):
  # host entropy into the pool, then RNDRESEEDCRNG; the clock stood still since the save
  open(my $rnd, ">", "/dev/urandom") or die "/dev/urandom: $!\n";
  syswrite($rnd, pack("H*", $entropy));
  print "rng-reseeded\n" if ioctl($rnd, 0x5207, 0);
  if (syscall(164, pack("qq", $sec, $usec), 0) == 0) { print "clock-set\n"; }
  else { system("date", "-u", "-s", "\@$sec") }
  mark("rng-clock");
  for my $user (grep { length } split /,/, $new_users) {
    next if defined getpwnam($user);
    system("useradd", "-m", "-s", "/bin/bash", "-G", $groups, $user) == 0
      or die "useradd $user failed\n";
  }
  mark("users");
}
unlink glob("$R/etc/ssh/ssh_host_*");
# nobody keeps the keys of the template's users
for my $f (glob("$R/root/.ssh/authorized_keys $R/home/*/.ssh/authorized_keys")) {
  truncate($f, 0) if -f $f;
}
while (my ($path, $mode, $owner, $hex) = splice(@files, 0, 4)) {
  my ($uid, $gid) = (getpwnam($owner))[2, 3];
  die "no user $owner in the guest\n" unless defined $uid;
  if ($hex eq "-") {
    mkdir "$R$path"; chown $uid, $gid, "$R$path"; chmod oct($mode), "$R$path";
  } else {
    spew("$R$path", pack("H*", $hex), oct($mode), $uid, $gid);
  }
}
if (open(my $h, ">", "$R/proc/sys/kernel/hostname")) { print $h "$name\n"; close $h; }
if (open(my $h, "<", "$R/etc/hosts")) {
  my @st = stat($h); local $/; my $text = <$h>; close $h;
  $text =~ s/^(127\.0\.1\.1[ \t]+).*$/$1$name $name/m;
  spew("$R/etc/hosts", $text, $st[2] & 07777, $st[4], $st[5]);
}
my $dbus = "$R/var/lib/dbus/machine-id";
if (-f $dbus && ! -l $dbus) {
  open(my $m, "<", "$R/etc/machine-id"); my $id = <$m>; spew($dbus, $id, 0444, 0, 0);
}
mark("files");
# no sshd restart: every connection's sshd (re-executed by the listener) loads the host
# keys from their files; the HostKey list counts from sshd's next start
print "reidentified\n";
"""


def reidentify_argv(name: str, accounts: list[Account], keys: dict[str, tuple[str, str]],
                    machine_id: str, epoch: float, entropy: bytes,
                    template_users: list[str] | None = None, root: str = "/") -> list[str]:
    """The guest agent's ``guest-exec`` of ``/usr/bin/perl`` in a fresh clone (as root):
    RNG, clock, users, hostname, machine-id, SSH host keys and authorized_keys (only this
    VM's: the keys of the template's users are emptied first). ``template_users``: the
    users the template has (the clone's other admins are created). ``root``: where the
    guest's files are (a test's directory; the RNG, clock and users are then left alone).
    """
    sec, usec = int(epoch), int((epoch % 1) * 1e6)
    new_users = [a.name for a in accounts if a.name not in set(template_users or ())]
    args = ["-e", PROGRAM, "--", root, name, str(sec), str(usec), entropy.hex(),
            ",".join(seed.ADMIN_GROUPS), ",".join(new_users)]
    for path, (data, mode, owner) in reidentify_files(name, accounts, keys,
                                                      machine_id).items():
        args += [path, f"{mode:o}", owner, "-" if data is None else data.hex()]
    return args
