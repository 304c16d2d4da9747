//! The on-call calendar server (`calendar_listen`):
//!
//! - `GET /calendars/<schedule>.ics`: an iCalendar feed of the schedule's
//!   shifts from a week ago to eight weeks ahead, for calendar apps to
//!   subscribe to.
//! - `GET /oncall/<schedule>[?at=<RFC 3339>]`: who is on call, as JSON (the
//!   same fields as the `tocsin.query.escalation.oncall` answer).
//!
//! With `calendar_token` set, every request carries it: `?token=` in the
//! URL (what a calendar app can send) or `Authorization: Bearer`; without
//! it the answer is 401. The token is compared by its SHA-256 digest in
//! constant time, and no request's URL is logged.
//!
//! Errors are JSON: `{"error": "not_found", "reason": "..."}`.

use std::sync::Arc;

use axum::{
    extract::{rejection::QueryRejection, Path, Query, Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tocsin_runtime::{clock::Clock, config::Secret, http_server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    ical,
    plan::Planner,
    query::{find_schedule, on_call_view, plus},
};

/// How far back a calendar feed reaches, so this week's past shifts show.
const FEED_PAST: SignedDuration = SignedDuration::from_hours(7 * 24);
/// How far ahead a calendar feed reaches.
const FEED_AHEAD: SignedDuration = SignedDuration::from_hours(56 * 24);

#[derive(Clone)]
struct CalendarState {
    planner: Arc<Planner>,
    clock: Arc<dyn Clock>,
    /// Every schedule name, for errors naming the defined ones.
    schedules: Arc<[String]>,
    /// SHA-256 of `calendar_token`, when set.
    token: Option<[u8; 32]>,
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// The calendar router, for embedding or tests.
pub(crate) fn router(
    planner: Arc<Planner>,
    clock: Arc<dyn Clock>,
    schedules: Vec<String>,
    token: Option<&Secret>,
) -> Router {
    let state = CalendarState {
        planner,
        clock,
        schedules: schedules.into(),
        token: token.map(|t| digest(t.expose())),
    };
    Router::new()
        // axum's router cannot match a parameter with a suffix
        // (`{name}.ics`), so the handler strips `.ics` itself.
        .route("/calendars/{file}", get(calendar))
        .route("/oncall/{name}", get(oncall))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; use /calendars/<schedule>.ics or /oncall/<schedule>".into(),
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// Lets a request through when no token is set or it carries the token.
async fn authorize(State(s): State<CalendarState>, req: Request, next: Next) -> Response {
    let Some(expected) = s.token else {
        return next.run(req).await;
    };
    match given_token(req.headers(), req.uri().query()) {
        Some(given) if bool::from(expected.ct_eq(&digest(&given))) => next.run(req).await,
        Some(_) => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the token is not this calendar server's (escalation.calendar_token)".into(),
        ),
        None => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this calendar server needs its token: add ?token=<escalation.calendar_token> to the URL, or send Authorization: Bearer <it>".into(),
        ),
    }
}

/// The token of a request: its bearer token, else its `token` parameter.
fn given_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    bearer.or_else(|| {
        form_urlencoded::parse(query?.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    })
}

/// Serves the calendar endpoints on `listener` until `shutdown` is
/// cancelled. `schedules` is every schedule name.
pub(crate) async fn serve(
    listener: TcpListener,
    planner: Arc<Planner>,
    clock: Arc<dyn Clock>,
    schedules: Vec<String>,
    token: Option<&Secret>,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "on-call calendar server listening");
    }
    http_server::serve(
        listener,
        router(planner, clock, schedules, token),
        http_server::small_server(MAX_CONNECTIONS, REFUSAL),
        http_server::Logged::new("calendar"),
        shutdown,
    )
    .await;
}

/// Connections the calendar server keeps open at once: calendar apps fetch
/// a feed now and then. At the cap a new one closes the oldest idle one.
pub(crate) const MAX_CONNECTIONS: usize = 128;
const REFUSAL: &str = r#"{"error":"too_many_connections","reason":"the calendar server has 128 requests in progress; try again"}"#;

#[derive(Serialize)]
struct ErrorBody {
    error: &'static str,
    reason: String,
}

fn error(status: StatusCode, error: &'static str, reason: String) -> Response {
    (status, Json(ErrorBody { error, reason })).into_response()
}

async fn calendar(State(s): State<CalendarState>, Path(file): Path<String>) -> Response {
    let Some(name) = file.strip_suffix(".ics") else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("calendar feeds end in .ics: /calendars/{file}.ics"),
        );
    };
    let schedule = match find_schedule(&s.planner, &s.schedules, name) {
        Ok(schedule) => schedule,
        Err(reason) => return error(StatusCode::NOT_FOUND, "not_found", reason),
    };
    let now = s.clock.now();
    let shifts = schedule.shifts(plus(now, -FEED_PAST), plus(now, FEED_AHEAD));
    (
        [(header::CONTENT_TYPE, "text/calendar; charset=utf-8")],
        ical::calendar(name, &shifts, now),
    )
        .into_response()
}

#[derive(Deserialize)]
struct OnCallParams {
    /// Default: now.
    at: Option<Timestamp>,
}

async fn oncall(
    State(s): State<CalendarState>,
    Path(name): Path<String>,
    params: Result<Query<OnCallParams>, QueryRejection>,
) -> Response {
    let at = match params {
        Ok(Query(p)) => p.at.unwrap_or_else(|| s.clock.now()),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                    "{}; `at` is an RFC 3339 time such as 2026-03-02T09:00:00Z",
                    e.body_text()
                ),
            )
        }
    };
    match find_schedule(&s.planner, &s.schedules, &name) {
        Ok(schedule) => Json(on_call_view(schedule, at)).into_response(),
        Err(reason) => error(StatusCode::NOT_FOUND, "not_found", reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{body::Body, http::Request};
    use tocsin_runtime::clock::ManualClock;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    use crate::query::tests::{names, planner};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn app(clock: &ManualClock) -> Router {
        router(Arc::new(planner()), Arc::new(clock.clone()), names(), None)
    }

    /// Status, content type and body of `GET uri`.
    async fn get(app: Router, uri: &str) -> (StatusCode, String, String) {
        let res = app
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let content_type = res
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap()
    }

    #[tokio::test]
    async fn the_feed_of_a_weekly_rotation() {
        let clock = ManualClock::new(ts("2026-03-02T07:50:00Z"));
        let (status, content_type, body) = get(app(&clock), "/calendars/primary.ics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "text/calendar; charset=utf-8");
        // RFC 5545: every line ends in CRLF, and there is no bare LF.
        assert!(body.ends_with("END:VCALENDAR\r\n"));
        assert_eq!(body.matches('\n').count(), body.matches("\r\n").count());
        let lines: Vec<&str> = body.split("\r\n").collect();
        assert_eq!(lines[0], "BEGIN:VCALENDAR");
        let events: Vec<(&str, &str, &str)> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with("DTSTART:"))
            .map(|(i, l)| (*l, lines[i + 1], lines[i + 2]))
            .collect();
        // From a week back to eight weeks ahead, both ends clipped; weekly
        // handoffs at 09:00 Berlin time, 07:00Z once summer time starts.
        assert_eq!(events.len(), 11);
        assert_eq!(
            events[..3],
            [
                (
                    "DTSTART:20260223T075000Z",
                    "DTEND:20260223T080000Z",
                    "SUMMARY:On call: alice (primary)"
                ),
                (
                    "DTSTART:20260223T080000Z",
                    "DTEND:20260302T080000Z",
                    "SUMMARY:On call: dave (primary)"
                ),
                (
                    "DTSTART:20260302T080000Z",
                    "DTEND:20260309T080000Z",
                    "SUMMARY:On call: alice (primary)"
                ),
            ]
        );
        assert_eq!(
            events[5..7],
            [
                (
                    "DTSTART:20260323T080000Z",
                    "DTEND:20260330T070000Z",
                    "SUMMARY:On call: dave (primary)"
                ),
                (
                    "DTSTART:20260330T070000Z",
                    "DTEND:20260406T070000Z",
                    "SUMMARY:On call: alice (primary)"
                ),
            ]
        );
        assert_eq!(
            events[10],
            (
                "DTSTART:20260427T070000Z",
                "DTEND:20260427T075000Z",
                "SUMMARY:On call: alice (primary)"
            )
        );
        assert!(lines.contains(&"DTSTAMP:20260302T075000Z"));
    }

    /// Status and body of `GET uri` with `headers`, on a server whose
    /// token is `token`.
    async fn get_with(token: &str, uri: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
        let clock = ManualClock::new(ts("2026-03-02T07:50:00Z"));
        let app = router(
            Arc::new(planner()),
            Arc::new(clock),
            names(),
            Some(&Secret::new(token)),
        );
        let mut req = Request::get(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn with_a_token_every_request_carries_it_in_the_url_or_as_a_bearer() {
        let token = "0123456789abcdef/+&=";
        let in_url = "0123456789abcdef%2F%2B%26%3D";
        for uri in [
            "/calendars/primary.ics",
            "/oncall/secondary",
            "/oncall/nope",
            "/elsewhere",
        ] {
            let (status, body) = get_with(token, uri, &[]).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}");
            assert!(
                body.contains("add ?token=<escalation.calendar_token> to the URL"),
                "{body}"
            );
            for wrong in [
                format!("{uri}?token=0123456789abcdeX"),
                format!("{uri}?token="),
            ] {
                let (status, body) = get_with(token, &wrong, &[]).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}");
                assert!(body.contains("not this calendar server's"), "{body}");
            }
            let (status, _) =
                get_with(token, uri, &[("authorization", "Bearer 0123456789abcdeX")]).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{uri} with a wrong bearer"
            );
        }
        let (status, body) = get_with(
            token,
            &format!("/calendars/primary.ics?token={in_url}"),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.starts_with("BEGIN:VCALENDAR"), "{body}");
        let (status, body) = get_with(
            token,
            &format!("/oncall/secondary?at=2026-03-03T12:00:00Z&token={in_url}"),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(json(&body)["at"], "2026-03-03T12:00:00Z");
        let bearer = format!("Bearer {token}");
        let (status, body) =
            get_with(token, "/oncall/secondary", &[("authorization", &bearer)]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // Past the token, the answers are what they are without one.
        let (status, body) = get_with(token, &format!("/oncall/nope?token={in_url}"), &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }

    #[tokio::test]
    async fn oncall_follows_the_clock() {
        let clock = ManualClock::new(ts("2026-03-02T07:50:00Z"));
        let (status, content_type, body) = get(app(&clock), "/oncall/secondary").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "application/json");
        let v = json(&body);
        assert_eq!(v["schedule"], "secondary");
        assert_eq!(v["at"], "2026-03-02T07:50:00Z");
        assert_eq!(v["user"], "carol");
        assert_eq!(v["layer"], "daily");
        assert_eq!(v["shift_end"], "2026-03-02T08:00:00Z");
        assert_eq!(v["next"][0]["user"], "bob");

        // After the 09:00 Berlin handoff.
        clock.set(ts("2026-03-02T08:00:00Z"));
        let v = json(&get(app(&clock), "/oncall/secondary").await.2);
        assert_eq!(v["user"], "bob");
        assert_eq!(v["shift_end"], "2026-03-03T08:00:00Z");

        // Another instant, asked for.
        let v = json(
            &get(
                app(&clock),
                "/oncall/secondary?at=2026-03-03T12:00:00%2B01:00",
            )
            .await
            .2,
        );
        assert_eq!(v["at"], "2026-03-03T11:00:00Z");
        assert_eq!(v["user"], "carol");
    }

    #[tokio::test]
    async fn errors_are_json_and_name_the_defined_schedules() {
        let clock = ManualClock::new(ts("2026-03-02T07:50:00Z"));
        for uri in ["/oncall/x", "/calendars/x.ics"] {
            let (status, content_type, body) = get(app(&clock), uri).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(content_type, "application/json");
            assert_eq!(
                json(&body),
                serde_json::json!({
                    "error": "not_found",
                    "reason": "no schedule \"x\" (defined: primary, secondary)"
                })
            );
        }
        for uri in ["/calendars/primary", "/nowhere"] {
            let (status, _, body) = get(app(&clock), uri).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(json(&body)["error"], "not_found");
        }
        let (status, _, body) = get(app(&clock), "/oncall/primary?at=yesterday").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(json(&body)["error"], "bad_request");
    }

    #[tokio::test]
    async fn serves_on_a_real_port_and_stops_on_shutdown() {
        let clock = ManualClock::new(ts("2026-03-02T07:50:00Z"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(planner()),
            Arc::new(clock),
            names(),
            None,
            shutdown.clone(),
        ));
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(
            b"GET /calendars/secondary.ics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("content-type: text/calendar; charset=utf-8\r\n"));
        assert!(response.contains("SUMMARY:On call: bob (secondary)\r\n"));

        shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
    }
}
