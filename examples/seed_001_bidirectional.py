# From seeds/001 ("Bidirectional Communication"): unchanged but for the import of Pipe
# (the page lost its indentation; it is restored here).
import multiprocessing
import hyperpipe
def child_process(conn):
    # Child sends first message
    conn.send("Have a nice day!")
    # Child receives response from parent
    response = conn.recv()
    print("Child received:", response)
if __name__ == "__main__":
    parent_conn, child_conn = hyperpipe.Pipe(duplex=True)
    # Create child process
    child = multiprocessing.Process(target=child_process, args=(child_conn,))
    child.start()
    # Parent receives message from child
    message = parent_conn.recv()
    print("Parent received:", message)
    # Parent sends response back to child
    parent_conn.send("Same to you!")
    child.join()
