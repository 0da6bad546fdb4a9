//! One place that turns a list of test cases into `#[tokio::test]`s per backend, so a new
//! test is the `async fn` and one name in a list.
//!
//! - [`backend_tests!`](crate::backend_tests): gateway-level cases, `async fn case(Backend)`, on
//!   a real gateway per test (`TestApp`) over the embedded store, standalone Redis and (with
//!   `all:`) a three-primary Redis Cluster.
//! - [`store_tests!`](crate::store_tests): store-level cases on the three stores themselves,
//!   passed by reference (`by_ref:`, `async fn case(&S)`) or shared (`by_arc:`,
//!   `async fn case(Arc<S>)`); the stores come from [`redis_store`], [`cluster_store`] and
//!   [`embedded_store`].

use std::path::Path;
use std::time::Duration;

use tokengate::storage::embedded::EmbeddedStore;
use tokengate::storage::redis::{RedisConfig, RedisStore};

use super::redis_server::{RedisCluster, RedisServer};

/// How tests reach Redis: a 2 s response timeout (outage tests override it).
pub fn redis_config(url: String, nodes: Vec<String>) -> RedisConfig {
    RedisConfig {
        url,
        cluster_nodes: nodes,
        key_prefix: "tgtest".into(),
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    }
}

/// A store on a standalone `redis-server`.
pub async fn redis_store(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&redis_config(server.url(), Vec::new()))
        .await
        .expect("connect to redis")
}

/// A store on a three-primary Cluster.
pub async fn cluster_store(cluster: &RedisCluster) -> RedisStore {
    let store = RedisStore::connect(&redis_config(String::new(), cluster.addrs()))
        .await
        .expect("connect to cluster");
    assert!(store.is_cluster());
    store
}

/// An embedded store in `dir`.
pub fn embedded_store(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(dir).expect("open embedded store")
}

/// Gateway-level cases, one test per backend: `backend_tests!(all: a, b)` on embedded, Redis
/// and Redis Cluster; `backend_tests!(standalone: a, b)` on embedded and Redis only.
#[macro_export]
macro_rules! backend_tests {
    (all: $($name:ident),* $(,)?) => {
        $crate::backend_tests!(@mod embedded Embedded $($name),*);
        $crate::backend_tests!(@mod redis Redis $($name),*);
        // The whole API contract on a three-primary Cluster too, not only the store contracts.
        $crate::backend_tests!(@mod redis_cluster RedisCluster $($name),*);
    };
    (standalone: $($name:ident),* $(,)?) => {
        $crate::backend_tests!(@mod embedded Embedded $($name),*);
        $crate::backend_tests!(@mod redis Redis $($name),*);
    };
    (@mod $module:ident $backend:ident $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::app::Backend::$backend).await
                }
            )*
        }
    };
}

/// Store-level cases on standalone Redis, a three-primary Cluster and redb, one test per pair:
/// `store_tests!(by_ref: a, b)` calls `a(&store)`, `store_tests!(by_arc: a, b)` calls
/// `a(Arc::new(store))`.
#[macro_export]
macro_rules! store_tests {
    ($pass:ident: $($case:ident),* $(,)?) => {
        mod redis_standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let server = $crate::support::redis_server::RedisServer::start();
                    let store = $crate::support::cases::redis_store(&server).await;
                    $crate::store_tests!(@call $pass super::$case, store);
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let cluster = tokio::task::spawn_blocking(
                        $crate::support::redis_server::RedisCluster::start,
                    )
                    .await
                    .expect("cluster start");
                    let store = $crate::support::cases::cluster_store(&cluster).await;
                    $crate::store_tests!(@call $pass super::$case, store);
                }
            )*
        }
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let store = $crate::support::cases::embedded_store(dir.path());
                    $crate::store_tests!(@call $pass super::$case, store);
                }
            )*
        }
    };
    (@call by_ref $case:path, $store:ident) => { $case(&$store).await };
    (@call by_arc $case:path, $store:ident) => { $case(std::sync::Arc::new($store)).await };
}
