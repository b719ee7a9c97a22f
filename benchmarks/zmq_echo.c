/* The libzmq floor for the host's CPU per message: a ROUTER that echoes every [routing id,
 * payload] message back, in C, with nothing but libzmq between the socket and the loop.
 * benchmarks/echo_floor.py builds it against the libzmq that pyzmq loads, so the figure is
 * what that library costs before any Python runs. Stops on a 4-byte "stop" payload.
 * The prototypes are libzmq's stable C API (zmq.h); pyzmq's wheels ship no header. */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

typedef struct zmq_msg_t { unsigned char bytes[64]; } zmq_msg_t;
void *zmq_ctx_new(void);
void *zmq_socket(void *context, int type);
int zmq_bind(void *socket, const char *endpoint);
int zmq_msg_init(zmq_msg_t *msg);
int zmq_msg_recv(zmq_msg_t *msg, void *socket, int flags);
int zmq_msg_send(zmq_msg_t *msg, void *socket, int flags);
size_t zmq_msg_size(const zmq_msg_t *msg);
void *zmq_msg_data(zmq_msg_t *msg);
int zmq_msg_close(zmq_msg_t *msg);

#define ZMQ_ROUTER 6
#define ZMQ_SNDMORE 2

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s ENDPOINT\n", argv[0]);
        return 2;
    }
    void *router = zmq_socket(zmq_ctx_new(), ZMQ_ROUTER);
    if (router == NULL || zmq_bind(router, argv[1]) != 0) {
        perror("zmq_bind");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        zmq_msg_t rid, payload;
        zmq_msg_init(&rid);
        zmq_msg_init(&payload);
        if (zmq_msg_recv(&rid, router, 0) < 0 || zmq_msg_recv(&payload, router, 0) < 0)
            return 1;
        if (zmq_msg_size(&payload) == 4 && memcmp(zmq_msg_data(&payload), "stop", 4) == 0)
            return 0;
        if (zmq_msg_send(&rid, router, ZMQ_SNDMORE) < 0 || zmq_msg_send(&payload, router, 0) < 0)
            return 1;
    }
}
