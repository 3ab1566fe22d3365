"""ssh's ProxyCommand for the local cluster: `tcp_pipe.py HOST PORT` joins stdin and stdout to
a TCP connection, so Ray's ssh reaches the cluster's sshd on a port of its own (netcat's job,
without needing netcat)."""

import os
import selectors
import socket
import sys


def main(host: str, port: int) -> None:
    sock = socket.create_connection((host, port))
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "in")
    sel.register(sock, selectors.EVENT_READ, "sock")
    while True:
        for key, _ in sel.select():
            if key.data == "in":
                data = os.read(sys.stdin.fileno(), 65536)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    sel.unregister(sys.stdin.fileno())
                    continue
                sock.sendall(data)
            else:
                data = sock.recv(65536)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(sys.stdout.fileno(), view):]


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
