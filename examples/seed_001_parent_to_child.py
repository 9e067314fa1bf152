# From seeds/001 ("Parent to Child Communication"): unchanged but for the import of Pipe
# (the page lost its indentation; it is restored here).
import multiprocessing
import hyperpipe
def child_process(conn):
    message = conn.recv()
    print("Child received:", message)
if __name__ == "__main__":
    parent_conn, child_conn = hyperpipe.Pipe()
    # Create child process
    child = multiprocessing.Process(target=child_process, args=(child_conn,))
    child.start()
    # Send message from parent to child
    parent_conn.send("Welcome to TutorialsPoint")
    child.join()
