# From seeds/000 (a Stack Overflow question): unchanged but for the import of Pipe.
import multiprocessing
import hyperpipe

def f(parent_conn, child_conn):
    parent_conn.close()
    while True:
        cmd, data = child_conn.recv()
        if cmd == "f1":
            child_conn.send("f1!")
        elif cmd == "f2":
            child_conn.send("f2!")
        else:
            raise NotImplementedError

if __name__ == "__main__":
    parent_conn, child_conn = hyperpipe.Pipe()
    p = multiprocessing.Process(target=f, args=(parent_conn, child_conn))
    p.start()

    child_conn.close()
    parent_conn.send(("f1", None))
    parent_conn.send(("f2", None))
    print(parent_conn.recv())
    print(parent_conn.recv())
