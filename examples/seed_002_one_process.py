# From seeds/002: unchanged but for the import of Pipe.
import multiprocessing
import hyperpipe

# Create a Pipe
parent_conn, child_conn = hyperpipe.Pipe()

# Send data from parent process
parent_conn.send("Hello from Parent")

# Receive data in child process
print(child_conn.recv())  # Output: Hello from Parent

# Close the connections
parent_conn.close()
child_conn.close()

# Visit our website PythonHelpDesk.com for more assistance.
